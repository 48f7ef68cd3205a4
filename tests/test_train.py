"""afkern-train: both stages end to end on a tiny random BERT (CPU), reload in afkern and in the
``adapters`` package, bad input, resume, atomic checkpoints, pruning, DDP on gloo with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import afkern
from afkern import train as T
from afkern.train import DataError, demo_vocabulary, load_task, make_demo_tasks, read_records, write_jsonl

from parity import assert_rounding_bound, f64_truth, judge

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HIDDEN = 24  # not a power of two
COMMON = ["--no-progress", "--max-length", "24", "--batch-size", "32", "--eval-batch-size", "64"]


def _tiny_model(path, hidden=HIDDEN, seed=0):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + demo_vocabulary()
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=os.path.join(path, "vocab.txt"), do_lower_case=True).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * hidden + 2, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    return str(path)


def _write_task(task, root, fmt):
    d = os.path.join(root, task.name)
    os.makedirs(d, exist_ok=True)
    for split, text, labels in (("train", task.train_text, task.train_labels), ("dev", task.dev_text, task.dev_labels)):
        rows = [{"text": t, "label": task.label_names[y]} for t, y in zip(text, labels)]
        p = os.path.join(d, f"{split}.{fmt}")
        if fmt == "jsonl":
            write_jsonl(p, rows)
        elif fmt == "json":
            with open(p, "w") as f:
                json.dump(rows, f)
        else:
            import csv

            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["text", "label"])
                w.writeheader()
                w.writerows(rows)
    return d


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices: one intra-op thread is several times faster than two on a loaded 2-core box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("train")
    model = _tiny_model(root / "model")
    sources, target = make_demo_tasks(seed=1, quick=False)
    senti, quest = sources[1], sources[2]
    for t, n_train in ((senti, 192), (quest, 128), (target, 96)):
        t.train_text, t.train_labels = t.train_text[:n_train], t.train_labels[:n_train]
        t.dev_text, t.dev_labels = t.dev_text[:96], t.dev_labels[:96]
    data = root / "data"
    dirs = {"question": _write_task(quest, data, "csv"), "sentiment": _write_task(senti, data, "jsonl"),
            "routing": _write_task(target, data, "json")}
    out = str(root / "out")
    res = T.run(["adapters", "--model", model, "--output-dir", out, "--task", f"question={dirs['question']}",
                 "--task", f"sentiment={dirs['sentiment']}/train.jsonl", "--dev", f"sentiment={dirs['sentiment']}/dev.jsonl",
                 "--epochs", "3", "--lr", "1e-2", "--reduction-factor", "4", "--seed", "0"] + COMMON)
    return dict(root=root, model=model, dirs=dirs, out=out, stage1=res)


def _fusion_args(env, out, *extra):
    return ["fusion", "--model", env["model"], "--output-dir", out, "--adapters", os.path.join(env["out"], "adapters"),
            "--task", f"routing={env['dirs']['routing']}", "--epochs", "3", "--lr", "1e-2", "--seed", "0"] + COMMON + list(extra)


def _batch(model_dir, texts):
    tok = T.load_tokenizer(model_dir)
    return dict(tok(texts, padding=True, return_tensors="pt"))


# ----------------------------------------------------------------------------- stage 1
def test_stage1_loss_falls_and_saved_files_reload(env):
    m = env["stage1"]["metrics"]
    assert set(m["tasks"]) == {"question", "sentiment"}
    for name, rec in m["tasks"].items():
        losses = [h["train_loss"] for h in rec["history"]]
        assert losses[-1] < losses[0], (name, losses)
    saved = json.load(open(os.path.join(env["out"], "metrics_adapters.json")))
    assert saved["tasks"]["sentiment"]["n_train"] == 192 and saved["tasks"]["question"]["n_dev"] == 96
    batch = _batch(env["model"], ["the pizza was great .", "what a boring match today ."])
    for name in ("question", "sentiment"):
        clf = env["stage1"]["models"][name].eval()
        back = T.load_classifier(env["model"], [os.path.join(env["out"], "adapters", name)],
                                 os.path.join(env["out"], "heads", name))
        with torch.no_grad():
            torch.testing.assert_close(back(**batch), clf(**batch), rtol=0, atol=0)
        assert os.path.isfile(os.path.join(env["out"], "adapters", name, "adapter.safetensors"))


# ----------------------------------------------------------------------------- stage 2
def test_stage2_fusion_reloads_in_afkern_and_adapters(env):
    out = str(env["root"] / "fusion")
    res = T.run(_fusion_args(env, out, "--prune-k", "1"))
    m = res["metrics"]
    losses = [h["train_loss"] for h in m["task"]["history"]]
    assert losses[-1] < losses[0], losses
    names = res["names"]
    assert names == ["question", "sentiment"]
    # only the fusion and the head trained
    clf = res["model"].eval()
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") or ".query." in n or ".key." in n or ".value." in n for n in trainable)
    # metrics JSON, heatmap, pruning report
    saved = json.load(open(os.path.join(out, "metrics_fusion.json")))
    assert saved["task"]["best_dev_accuracy"] == m["task"]["best_dev_accuracy"]
    assert os.path.getsize(os.path.join(out, "fusion_weights-routing.png")) > 1000
    for layer, w in saved["mean_fusion_weights"].items():
        # N float32 means over the tokens (pairwise sums: at most ~32 roundings each) of rows summing to 1
        assert_rounding_bound(f"mean fusion weights of {layer}", sum(w.values()), 1.0, terms=32 * len(w),
                              dtype=torch.float32)
    pr = saved["pruning"]
    assert pr["k"] == 1 and all(len(v) == 1 for v in pr["kept"].values()) and 0 <= pr["dev_accuracy_pruned"] <= 1
    pruned_blocks = [b for _, b in afkern.fused_blocks(res["pruned_model"].encoder)]
    assert [b.n_adapters for b in pruned_blocks] == [1, 1]

    batch = _batch(env["model"], ["honestly the soup felt awful today .", "the tennis and the goal were superb ."])
    with torch.no_grad():
        ref = clf.encoder(**batch).last_hidden_state
    fdir = m["fusion_dir"]
    # afkern
    from transformers import BertModel

    back = afkern.load_adapterhub(BertModel.from_pretrained(env["model"]), m["saved_adapter_dirs"], fusion_dir=fdir).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).last_hidden_state, ref, rtol=0, atol=0)
        head, meta = T.load_head(m["head_dir"])
        torch.testing.assert_close(T.AdapterClassifier(back, head).eval()(**batch), clf(**batch), rtol=0, atol=0)
    assert meta["label_names"] == ["indoor_complaint", "indoor_praise", "outdoor_complaint", "outdoor_praise"]
    # AdapterHub's adapters package
    adapters = pytest.importorskip("adapters")
    from adapters.composition import Fuse

    hub = BertModel.from_pretrained(env["model"])
    adapters.init(hub)
    for d in m["saved_adapter_dirs"]:
        hub.load_adapter(d, use_safetensors=True)  # adapters reads .bin unless told
    hub.load_adapter_fusion(fdir, use_safetensors=True)
    hub.set_active_adapters(Fuse(*names))
    hub.eval()
    with torch.no_grad():
        judge("afkern's trained model against AdapterHub", ref, hub(**batch).last_hidden_state, f64_truth(hub, batch))


# ----------------------------------------------------------------------------- resume
def test_resume_restores_step_optimizer_temperature_and_matches_uninterrupted(env):
    full = T.run(_fusion_args(env, str(env["root"] / "resume_full"), "--fusion-temperature", "--epochs", "2"))
    out = str(env["root"] / "resume")
    assert T.main(_fusion_args(env, out, "--fusion-temperature", "--epochs", "2", "--stop-after-steps", "4")) == 3
    ck = T.load_checkpoint(os.path.join(out, "checkpoints", "fusion-routing.pt"))
    assert ck["progress"]["global_step"] == 4 and ck["progress"]["epoch"] == 1  # 3 steps per epoch + 1
    # 3 + 1 training forwards and one dev pass of 2 batches, each lowers T by 50 / 1000
    t_expect = 50 - 6 * 0.05
    assert len(ck["temperatures"]) == 2 and all(v == pytest.approx(t_expect) for v in ck["temperatures"].values())
    # the temperature also travels in the state dict: the extra state of each block's fusion ([temperature])
    extra = [v for k, v in ck["state"].items() if k.endswith("._extra_state") and ".fusions." in k]
    assert len(extra) == 2 and all(v[0].item() == pytest.approx(t_expect) for v in extra)
    opt_steps = {float(s["step"]) for s in ck["optimizer"]["state"].values()}
    assert opt_steps == {4.0} and ck["scheduler"]["last_epoch"] == 4
    resumed = T.run(_fusion_args(env, out, "--fusion-temperature", "--epochs", "2", "--resume"))
    a, b = T.trainable_state(full["model"]), T.trainable_state(resumed["model"])
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    assert resumed["metrics"]["task"]["history"] == full["metrics"]["task"]["history"]
    # a changed setting is refused instead of silently mixing runs
    with pytest.raises(T.TrainError, match="different settings"):
        T.run(_fusion_args(env, out, "--fusion-temperature", "--epochs", "2", "--resume", "--lr", "1e-3"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    p = str(tmp_path / "ck.pt")
    good = {"format": T.CKPT_FORMAT, "x": torch.arange(3.0), "progress": {"global_step": 1}}
    T.save_checkpoint(p, good)

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        T.save_checkpoint(p, {"format": T.CKPT_FORMAT, "x": torch.zeros(3), "progress": {"global_step": 2}})
    monkeypatch.undo()
    ck = T.load_checkpoint(p)
    assert torch.equal(ck["x"], torch.arange(3.0)) and ck["progress"]["global_step"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]


# ----------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("keep", [[0, 1, 2], [2, 0], [1]])
def test_prune_block_equals_block_of_kept_adapters(keep):
    torch.manual_seed(0)
    d, N = 40, 3
    fc = afkern.FusionConfig.dynamic(temperature=True)  # a temperature other than 1 needs the annealed softmax
    full = afkern.FusedAdapterBlock(d, ["a", "b", "c"], afkern.AdapterConfig(reduction_factor=8), fc, in_features=56,
                                    dtype=torch.float64).eval()
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.3)
    full.temperature = 3.0
    pruned = T.prune_block(full, keep)
    ks = sorted(keep)
    assert pruned.adapter_names == [full.adapter_names[i] for i in ks] and pruned.temperature == 3.0
    expect = afkern.FusedAdapterBlock(d, pruned.adapter_names, afkern.AdapterConfig(reduction_factor=8), fc,
                                      in_features=56, dtype=torch.float64).eval()
    expect.load_state_dict({k: v for k, v in full.state_dict().items() if k.startswith(("dense.", "LayerNorm."))},
                           strict=False)
    with torch.no_grad():
        for lin in ("query", "key", "value"):
            getattr(expect, lin).load_state_dict(getattr(full, lin).state_dict())
    for j, i in enumerate(ks):
        st = full.adapter_state(i)
        expect.set_adapter_weights(j, st["adapter_down.0.weight"], st["adapter_down.0.bias"], st["adapter_up.weight"],
                                   st["adapter_up.bias"])
    h, x = torch.randn(7, 56, dtype=torch.float64), torch.randn(7, d, dtype=torch.float64)

    def at_3(b):  # every forward anneals the temperature (AdapterHub does it in eval too)
        b.temperature = 3.0
        return b

    for b in (pruned, expect, full):
        b.set_backend("reference")
    torch.testing.assert_close(at_3(pruned)(h, x), at_3(expect)(h, x), rtol=1e-12, atol=1e-12)
    if len(ks) == N:
        torch.testing.assert_close(at_3(pruned)(h, x), at_3(full)(h, x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        T.prune_block(full, [3])
    with pytest.raises(ValueError, match="at least one"):
        T.prune_block(full, [])


# ----------------------------------------------------------------------------- bad input
def _run_err(capsys, argv):
    assert T.main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_training(env, tmp_path, capsys):
    model, out = env["model"], str(tmp_path / "out")
    base = ["adapters", "--model", model, "--output-dir", out, "--epochs", "1", "--no-progress"]
    (tmp_path / "cols.csv").write_text("sentence,label\nhello there,a\nbye now,b\n")
    err = _run_err(capsys, base + ["--task", f"x={tmp_path / 'cols.csv'}"])
    assert "missing column" in err and "'text'" in err and "sentence" in err
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in _run_err(capsys, base + ["--task", f"x={tmp_path / 'empty.jsonl'}"])
    (tmp_path / "ints.csv").write_text("text,label\n" + "".join(f"the pizza {i},{i % 3}\n" for i in range(12)))
    err = _run_err(capsys, base + ["--task", f"x={tmp_path / 'ints.csv'}", "--num-labels", "2"])
    assert "outside the classification head" in err and "label 2" in err
    (tmp_path / "tr.csv").write_text("text,label\nthe pizza,good\nthe soup,bad\n")
    (tmp_path / "dv.csv").write_text("text,label\nthe bread,ugly\n")
    err = _run_err(capsys, base + ["--task", f"x={tmp_path / 'tr.csv'}", "--dev", f"x={tmp_path / 'dv.csv'}"])
    assert "'ugly'" in err and "outside the classification head" in err
    # a bad second task stops the run before the first one trains
    err = _run_err(capsys, base + ["--task", f"ok={env['dirs']['question']}", "--task", f"x={tmp_path / 'empty.jsonl'}"])
    assert "is empty" in err
    nowts = tmp_path / "noweights"
    nowts.mkdir()
    (nowts / "config.json").write_text(json.dumps({"model_type": "bert"}))
    err = _run_err(capsys, ["adapters", "--model", str(nowts), "--output-dir", out, "--task", f"ok={env['dirs']['question']}"])
    assert "has no weights" in err
    # adapters trained for another hidden size
    from transformers import BertModel

    other = BertModel.from_pretrained(_tiny_model(tmp_path / "wide", hidden=32))
    afkern.patch_bert(other, ["wide"], fusion_config=False)
    afkern.save_adapterhub(other, str(tmp_path / "wide_adapters"))
    err = _run_err(capsys, _fusion_args(env, out) + ["--adapters", str(tmp_path / "wide_adapters" / "wide")])
    assert "hidden size 32" in err and f"has {HIDDEN}" in err
    assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_data_formats_and_missing_datasets(tmp_path, monkeypatch):
    rows = [{"text": f"q {i}", "text_pair": f"a {i}", "label": ["no", "yes"][i % 2]} for i in range(10)]
    write_jsonl(str(tmp_path / "p.jsonl"), rows)
    with open(tmp_path / "cols.json", "w") as f:
        json.dump({k: [r[k] for r in rows] for k in rows[0]}, f)
    a = load_task("p", str(tmp_path / "p.jsonl"), dev_fraction=0.2, seed=3)
    b = load_task("p", str(tmp_path / "cols.json"), dev_fraction=0.2, seed=3)
    assert a.label_names == ["no", "yes"] and a.train_pair is not None and len(a.dev_text) == 2
    assert (a.train_text, a.train_pair, a.train_labels) == (b.train_text, b.train_pair, b.train_labels)
    assert read_records(str(tmp_path / "p.jsonl"))[3]["label"] == "yes"
    import importlib.util as iu

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(DataError, match="needs the Hugging Face `datasets` package"):
        load_task("g", "hf:glue:sst2")


def test_help_documents_every_option():
    p = T.build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert set(sub.choices) == {"adapters", "fusion", "demo", "predict"}
    for name, sp in sub.choices.items():
        for act in sp._actions:
            assert act.help and act.help.strip(), (name, act.option_strings)


def test_demo_quick_on_tiny_model_labels_generated_data(tmp_path, capsys):
    model = _tiny_model(tmp_path / "m")
    out = str(tmp_path / "demo")
    T.run(["demo", "--quick", "--model", model, "--output-dir", out, "--no-progress", "--adapter-epochs", "1",
           "--fusion-epochs", "1"])
    text = capsys.readouterr().out
    assert "GENERATED data" in text and "demo summary (GENERATED data" in text
    summary = json.load(open(os.path.join(out, "metrics_demo.json")))
    assert summary["data_note"].startswith("GENERATED")
    for f in ("metrics_adapters.json", "metrics_fusion.json"):
        assert json.load(open(os.path.join(out, f)))["data_note"].startswith("GENERATED")
    assert json.loads(open(os.path.join(out, "data", "routing", "train.jsonl")).readline())["generated"] is True
    assert {"single_adapter_dev_accuracy", "fusion_dev_accuracy", "pruning", "wall_time_s"} <= set(summary)


# ----------------------------------------------------------------------------- DDP
def test_ddp_two_processes_gloo(env):
    out = str(env["root"] / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "afkern.train"] + \
        _fusion_args(env, out, "--check-sync", "--epochs", "2")
    envv = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=envv)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.load(open(os.path.join(out, "metrics_fusion.json")))
    assert m["world_size"] == 2 and m["ddp_params_in_sync"] is True
    losses = [h["train_loss"] for h in m["task"]["history"]]
    assert len(losses) == 2 and losses[-1] < losses[0]
    # each rank saw half of the 96 training examples per step: 2 epochs x ceil(48 / 32) steps
    assert m["task"]["global_step"] == 4
    assert os.path.isfile(os.path.join(m["fusion_dir"], "model_adapter_fusion.safetensors"))


# ----------------------------------------------------------------------------- issue 13 item 4: never lose or fake work
def _copy_task(env, tmp_path, name="routing"):
    import shutil

    dst = str(tmp_path / f"{name}_copy")
    shutil.copytree(env["dirs"][name], dst)
    return dst


def test_resume_refuses_other_data_for_the_same_task(env, tmp_path, capsys):
    """Found: --resume with another data file printed 'resumed ... best dev accuracy' and trained nothing."""
    data = _copy_task(env, tmp_path)
    out = str(tmp_path / "out")
    args = _fusion_args(env, out, "--epochs", "1")
    args[args.index("--task") + 1] = f"routing={data}"
    first = T.run(args)
    ck_path = os.path.join(out, "checkpoints", "fusion-routing.pt")
    ck = T.load_checkpoint(ck_path)
    assert ck["progress"]["finished"] and len(ck["fingerprint"]["data"]) == 64
    # the same examples under another path: resumable (the hash is of the content, not the path)
    same = _copy_task(env, tmp_path / "same")
    again = list(args) + ["--resume"]
    again[again.index("--task") + 1] = f"routing={same}"
    res = T.run(again)
    assert res["metrics"]["task"]["best_dev_accuracy"] == first["metrics"]["task"]["best_dev_accuracy"]
    # one label changed: refused, with the reason, before anything is trained or written
    with open(os.path.join(data, "train.json")) as f:
        rows = json.load(f)
    rows[0]["label"] = next(lab for lab in ("indoor_praise", "outdoor_complaint") if lab != rows[0]["label"])
    with open(os.path.join(data, "train.json"), "w") as f:
        json.dump(rows, f)
    before = open(ck_path, "rb").read()
    with pytest.raises(T.TrainError, match="different data"):
        T.run(args + ["--resume"])
    capsys.readouterr()
    assert T.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "different data for task 'routing'" in err and "--overwrite" in err
    assert open(ck_path, "rb").read() == before
    # a changed dev file is refused as well
    os.rename(os.path.join(same, "dev.json"), os.path.join(same, "dev_old.json"))
    with open(os.path.join(same, "dev_old.json")) as f:
        dev = json.load(f)
    with open(os.path.join(same, "dev.json"), "w") as f:
        json.dump(dev[:-1], f)
    with pytest.raises(T.TrainError, match="different data"):
        T.run(again)


def test_stage1_resume_checks_every_task_before_training_any(env, tmp_path):
    data = _copy_task(env, tmp_path, "question")
    out = str(tmp_path / "out")
    args = ["adapters", "--model", env["model"], "--output-dir", out, "--task", f"question={data}",
            "--task", f"sentiment={env['dirs']['sentiment']}", "--epochs", "1", "--lr", "1e-2", "--reduction-factor", "4",
            "--stop-after-steps", "5"] + COMMON
    assert T.main(args) == 3  # question done (4 steps), sentiment stopped after 5 of its 6 steps
    with open(os.path.join(data, "train.csv")) as f:
        text = f.read()
    with open(os.path.join(data, "train.csv"), "w") as f:
        f.write(text.replace("question", "statement", 1) if "question\n" in text else text + "one more ?,question\n")
    before = {n: open(os.path.join(out, "checkpoints", f"adapters-{n}.pt"), "rb").read() for n in ("question", "sentiment")}
    with pytest.raises(T.TrainError, match="different data for task 'question'"):
        T.run([a for a in args if a not in ("--stop-after-steps", "5")] + ["--resume"])
    assert {n: open(os.path.join(out, "checkpoints", f"adapters-{n}.pt"), "rb").read() for n in before} == before


def test_used_output_dir_needs_overwrite_and_metrics_are_merged(env, tmp_path, capsys):
    """Found: a second run without --resume replaced a 4-epoch adapter by a 1-epoch one and dropped
    the other task from the metrics file."""
    out = str(tmp_path / "out")
    base = ["adapters", "--model", env["model"], "--output-dir", out, "--lr", "1e-2", "--reduction-factor", "4"] + COMMON
    T.run(base + ["--task", f"question={env['dirs']['question']}", "--task", f"sentiment={env['dirs']['sentiment']}",
                  "--epochs", "2"])
    adapter = os.path.join(out, "adapters", "question", "adapter.safetensors")
    saved = open(adapter, "rb").read()
    metrics = open(os.path.join(out, "metrics_adapters.json")).read()
    assert T.main(base + ["--task", f"question={env['dirs']['question']}", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and "--overwrite" in err and "--resume" in err and "adapters/question" in err
    assert open(adapter, "rb").read() == saved and open(os.path.join(out, "metrics_adapters.json")).read() == metrics
    # --overwrite replaces that task and keeps the other one's record
    T.run(base + ["--task", f"question={env['dirs']['question']}", "--epochs", "1", "--overwrite"])
    m = json.load(open(os.path.join(out, "metrics_adapters.json")))
    assert set(m["tasks"]) == {"question", "sentiment"}
    assert len(m["tasks"]["question"]["history"]) == 1 and len(m["tasks"]["sentiment"]["history"]) == 2
    assert m["tasks"]["question"]["settings"]["epochs"] == 1 and m["tasks"]["sentiment"]["settings"]["epochs"] == 2
    assert open(adapter, "rb").read() != saved
    # a new task into the same directory needs no flag and is added
    routing = ["--task", f"routing={env['dirs']['routing']}", "--epochs", "1"]
    T.run(base + routing)
    assert set(json.load(open(os.path.join(out, "metrics_adapters.json")))["tasks"]) == {"question", "sentiment", "routing"}
    # stage 2: one record per target task
    T.run(_fusion_args(env, out, "--epochs", "1", "--no-heatmap"))
    question = _fusion_args(env, out, "--epochs", "1", "--no-heatmap")
    question[question.index("--task") + 1] = f"question={env['dirs']['question']}"
    T.run(question)
    mf = json.load(open(os.path.join(out, "metrics_fusion.json")))
    assert set(mf["targets"]) == {"routing", "question"} and mf["task"]["name"] == "question"
    assert T.main(_fusion_args(env, out, "--epochs", "1", "--no-heatmap")) == 2
    assert "fusion-routing" in capsys.readouterr().err


def _fusion_full(env, root):
    return T.run(_fusion_args(env, str(root / "full"), "--fusion-temperature", "--epochs", "2", "--no-heatmap"))


def _same_training(a, b):
    sa, sb = T.trainable_state(a["model"]), T.trainable_state(b["model"])
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k], k
    assert a["metrics"]["task"]["history"] == b["metrics"]["task"]["history"]


@pytest.mark.parametrize("where", ["step", "sigint", "dev pass"])
def test_ctrl_c_stops_cleanly_with_a_checkpoint_and_resumes_exactly(env, tmp_path, capsys, monkeypatch, where):
    """Found: Ctrl-C printed a raw traceback and kept nothing."""
    import signal

    from afkern.train import loop

    full = _fusion_full(env, tmp_path)
    out = str(tmp_path / "run")
    args = _fusion_args(env, out, "--fusion-temperature", "--epochs", "2", "--no-heatmap")
    calls = {"n": 0}
    real_step, real_eval = loop.train_step, loop.evaluate

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5 and where == "step":
            raise KeyboardInterrupt  # inside the step, before the optimizer update
        if calls["n"] == 5 and where == "sigint":
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: this step finishes, then the loop stops
        return real_step(*a, **k)

    def evaluate(*a, **k):
        acc = real_eval(*a, **k)  # the dev pass has annealed the temperature
        if where == "dev pass":
            raise KeyboardInterrupt
        return acc

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "evaluate", evaluate)
    capsys.readouterr()
    assert T.main(args) == 130
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "--resume" in cap.err and "--resume" in cap.out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ck = T.load_checkpoint(os.path.join(out, "checkpoints", "fusion-routing.pt"))
    assert ck["progress"]["global_step"] == {"step": 4, "sigint": 5, "dev pass": 3}[where]
    # 3 steps per epoch; the dev pass at the end of epoch 1 (2 batches) anneals too, unless it was interrupted
    forwards = ck["progress"]["global_step"] + (2 if ck["progress"]["epoch"] == 1 else 0)
    assert all(v == pytest.approx(50 - 0.05 * forwards) for v in ck["temperatures"].values())
    monkeypatch.undo()
    _same_training(full, T.run(args + ["--resume"]))


def test_ctrl_c_in_a_real_process_keeps_a_checkpoint(env, tmp_path):
    import signal
    import time

    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "afkern.train"] + _fusion_args(env, out, "--epochs", "500", "--patience", "0")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    lines = []
    t0 = time.time()
    while time.time() - t0 < 120:
        line = p.stdout.readline()
        lines.append(line)
        if "epoch 2/500" in line or not line:
            break
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 130, "".join(lines) + rest + err
    assert "Traceback" not in err and "--resume" in err
    ck = T.load_checkpoint(os.path.join(out, "checkpoints", "fusion-routing.pt"))
    assert ck["progress"]["global_step"] >= 6 and not ck["progress"]["finished"]


def test_missing_extra_is_refused_before_training(env, tmp_path, capsys, monkeypatch):
    """Found: without matplotlib `fusion` trained to the end, then crashed in the heatmap before
    writing its metrics."""
    import importlib.util as iu

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = str(tmp_path / "out")
    for argv in (_fusion_args(env, out), ["demo", "--quick", "--model", env["model"], "--output-dir", out]):
        err = _run_err(capsys, argv)
        assert 'pip install "afkern[train]"' in err and "matplotlib" in err and "--no-heatmap" in err
        assert not os.path.exists(out)
    res = T.run(_fusion_args(env, out, "--epochs", "1", "--no-heatmap"))
    m = json.load(open(os.path.join(out, "metrics_fusion.json")))
    assert m["heatmap"] is None and m["task"]["best_dev_accuracy"] == res["metrics"]["task"]["best_dev_accuracy"]
    assert not os.path.exists(os.path.join(out, "fusion_weights-routing.png"))


def test_metrics_are_written_before_the_figure(env, tmp_path, capsys, monkeypatch):
    from afkern.train import stages

    def broken(*a, **k):
        raise RuntimeError("no display")

    monkeypatch.setattr(stages, "plot_fusion_weights", broken)
    out = str(tmp_path / "out")
    assert T.main(_fusion_args(env, out, "--epochs", "1", "--prune-k", "1")) == 0
    assert "heatmap" in capsys.readouterr().err
    m = json.load(open(os.path.join(out, "metrics_fusion.json")))
    assert m["heatmap"] is None and "no display" in m["heatmap_error"]
    assert m["task"]["best_dev_accuracy"] >= 0 and m["pruning"]["k"] == 1 and m["mean_fusion_weights"]


def test_prune_k_saves_a_pruned_model_that_reloads_exactly(env, tmp_path):
    """Found: --prune-k reported accuracy and speed but saved no pruned model."""
    out = str(tmp_path / "out")
    res = T.run(_fusion_args(env, out, "--prune-k", "1", "--fusion-temperature"))
    m = json.load(open(os.path.join(out, "metrics_fusion.json")))
    path = m["pruning"]["saved"]
    assert path == os.path.join(out, "fusion-routing", "pruned-k1.json") and os.path.isfile(path)
    spec = json.load(open(path))
    assert spec["kept"] == m["pruning"]["kept"] and spec["adapters"] == ["question", "sentiment"]
    pruned = res["pruned_model"].eval()
    assert [b.n_adapters for _, b in afkern.fused_blocks(pruned.encoder)] == [1, 1]
    back = T.load_classifier(env["model"], m["saved_adapter_dirs"], m["head_dir"], m["fusion_dir"], pruned=path)
    assert {n: b.adapter_names for n, b in afkern.fused_blocks(back.encoder)} == spec["kept"]
    assert {n: b.temperature for n, b in afkern.fused_blocks(back.encoder)} == \
        {n: b.temperature for n, b in afkern.fused_blocks(pruned.encoder)} != {}
    batch = _batch(env["model"], ["honestly the soup felt awful today .", "the tennis and the goal were superb ."])
    with torch.no_grad():
        torch.testing.assert_close(back(**batch), pruned(**batch), rtol=0, atol=0)
    # the full fusion reloads with its annealed temperature as well
    full = T.load_classifier(env["model"], m["saved_adapter_dirs"], m["head_dir"], m["fusion_dir"])
    with torch.no_grad():
        torch.testing.assert_close(full(**batch), res["model"].eval()(**batch), rtol=0, atol=0)


# ----------------------------------------------------------------------------- data errors
def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_data_errors_name_file_and_line(tmp_path):
    csv_p = _write(tmp_path / "a.csv", "text,label\nthe pizza,good\n ,bad\nthe soup,bad\n")
    with pytest.raises(DataError, match=f"{csv_p} line 3: empty"):
        load_task("a", csv_p)
    jl = _write(tmp_path / "a.jsonl", '{"text": "x", "label": 0}\n\n{"text": "y", "label": 1}\n{"text": 3, "label": 0}\n')
    with pytest.raises(DataError, match=f"{jl} line 4: empty or non-text 'text'"):
        load_task("a", jl)
    js = _write(tmp_path / "a.json", '[\n  {"text": "x", "label": 0},\n  {"text": "y",\n   "label": 1},\n  {"text": "z"}\n]\n')
    with pytest.raises(DataError, match=f"{js} line 5: no 'label'"):
        load_task("a", js)
    tr = _write(tmp_path / "tr.csv", "text,label\na,x\nb,y\n")
    dv = _write(tmp_path / "dv.csv", "text,label\nc,x\nd,z\n")
    with pytest.raises(DataError, match=f"{dv} line 3: label 'z', outside"):
        load_task("a", tr, dv)


def test_missing_column_suggests_the_options(env, tmp_path, capsys):
    p = _write(tmp_path / "c.csv", "sentence,target\nhello there,a\nbye now,b\n")
    err = _run_err(capsys, ["adapters", "--model", env["model"], "--output-dir", str(tmp_path / "o"), "--task", f"x={p}"])
    assert "--text-column" in err and "--label-column" in err and "'sentence'" in err
    with pytest.raises(DataError, match="--label-column") as e:
        load_task("x", p, text_column="sentence")
    assert "--text-column" not in str(e.value)
    assert load_task("x", p, text_column="sentence", label_column="target", dev_fraction=0.5).label_names == ["a", "b"]


def test_labels_are_checked_before_the_dev_split(tmp_path):
    import random

    n, seed = 20, 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = order[0]  # held out as dev with dev_fraction 0.1
    rows = [{"text": f"example {i}", "label": "c" if i == held else "ab"[i % 2]} for i in range(n)]
    write_jsonl(str(tmp_path / "t.jsonl"), rows)
    t = load_task("t", str(tmp_path / "t.jsonl"), dev_fraction=0.1, seed=seed)
    assert t.label_names == ["a", "b", "c"] and t.dev_labels.count(2) == 1 and len(t.dev_text) == 2
    rows[held]["label"] = 2
    for r in rows:
        r["label"] = 2 if r["label"] in ("c", 2) else "ab".index(r["label"])
    write_jsonl(str(tmp_path / "i.jsonl"), rows)
    with pytest.raises(DataError, match=f"{tmp_path / 'i.jsonl'} line {held + 1}: label 2, outside"):
        load_task("i", str(tmp_path / "i.jsonl"), num_labels=2, dev_fraction=0.1, seed=seed)


def test_tsv_and_float_labels(tmp_path):
    rows = "".join(f"the pizza {i}\t{i % 2}.0\n" for i in range(10))
    a = load_task("a", _write(tmp_path / "a.tsv", "text\tlabel\n" + rows), dev_fraction=0.2)
    b = load_task("b", _write(tmp_path / "b.csv", "text\tlabel\n" + rows), dev_fraction=0.2)  # tab-separated .csv
    assert a.label_names == ["0", "1"] and (a.train_text, a.train_labels) == (b.train_text, b.train_labels)
    assert a.train_text[0].startswith("the pizza") and set(a.train_labels) == {0, 1}
    js = tmp_path / "f.json"
    js.write_text(json.dumps([{"text": f"t {i}", "label": [0.0, 1.0, 2][i % 3]} for i in range(9)] + [{"text": "u", "label": "1"}]))
    c = load_task("c", str(js), dev_fraction=0.2)
    assert c.label_names == ["0", "1", "2"] and sorted(set(c.train_labels + c.dev_labels)) == [0, 1, 2]
    js.write_text("[\n" + ",\n".join(json.dumps({"text": f"t {i}", "label": [0.0, 0.5][i % 2]}) for i in range(6)) + "\n]")
    with pytest.raises(DataError, match="line 3: label 0.5 is not a whole number"):
        load_task("c", str(js))
    (tmp_path / "dir").mkdir()
    _write(tmp_path / "dir" / "train.tsv", "text\tlabel\n" + rows)
    _write(tmp_path / "dir" / "dev.tsv", "text\tlabel\nthe soup\t1\n")
    d = load_task("d", str(tmp_path / "dir"))
    assert len(d.train_text) == 10 and d.dev_labels == [1]
    # TSV does not quote (GLUE's files): a text that starts with a quote stays on its line
    g = _write(tmp_path / "g.tsv", 'sentence\tlabel\n" the movie is good\t1\nit \'s a "charming" film\t1\n"bad"\t"0"\n')
    e = load_task("g", g, str(g), text_column="sentence")
    assert e.train_text == ['" the movie is good', 'it \'s a "charming" film', "bad"] and e.train_labels == [1, 1, 0]


def test_help_shows_each_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    p = T.build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        text = sp.format_help()
        assert "(default: None)" not in text, name
        for line in text.splitlines():
            assert line.lower().count("default") <= 1, (name, line)
        assert "(default: 64)" in text
        assert "(default: 0.1)" in text or name == "predict"  # --head-dropout: the training commands


def test_demo_refuses_its_old_output_resumes_and_overwrites(tmp_path, capsys):
    model = _tiny_model(tmp_path / "m")
    out = str(tmp_path / "demo")
    args = ["demo", "--quick", "--model", model, "--output-dir", out, "--no-progress", "--adapter-epochs", "1",
            "--fusion-epochs", "1", "--no-heatmap"]
    T.run(args)
    first = json.load(open(os.path.join(out, "metrics_demo.json")))
    capsys.readouterr()
    assert T.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.load(open(os.path.join(out, "metrics_demo.json"))) == first
    T.run(args + ["--resume"])  # every stage finished: reloaded, not retrained
    text = capsys.readouterr().out
    assert "not retrained" in text and "epoch 1/1" not in text
    again = json.load(open(os.path.join(out, "metrics_demo.json")))
    for k in ("single_adapter_dev_accuracy", "fusion_dev_accuracy", "source_dev_accuracy"):
        assert again[k] == first[k], k
    T.run(args + ["--overwrite"])
    assert "epoch 1/1" in capsys.readouterr().out


def test_afkern_data_still_imports():
    import afkern.data as D

    assert D.make_demo_tasks is T.make_demo_tasks and D.DataError is T.DataError and D.load_task is T.load_task


def test_metrics_files_of_older_runs_are_kept(tmp_path):
    from afkern.train import metrics as M

    legacy = {"task": {"best_dev_accuracy": 0.5}, "fusion_dir": str(tmp_path / "fusion-rte" / "a,b")}
    with open(tmp_path / "metrics_fusion.json", "w") as f:
        json.dump(legacy, f)
    M.write_fusion_metrics(str(tmp_path), {"task": {"name": "sst2", "best_dev_accuracy": 0.9}})
    m = json.load(open(tmp_path / "metrics_fusion.json"))
    assert set(m["targets"]) == {"rte", "sst2"} and m["targets"]["rte"]["task"]["best_dev_accuracy"] == 0.5
    assert m["task"]["name"] == "sst2"
    (tmp_path / "metrics_adapters.json").write_text("{not json")
    with pytest.raises(T.TrainError, match="--overwrite"):
        M.write_adapter_metrics(str(tmp_path), {"tasks": {"a": {}}})
    assert (tmp_path / "metrics_adapters.json").read_text() == "{not json"
    M.write_adapter_metrics(str(tmp_path), {"tasks": {"a": {}}}, overwrite=True)
    assert json.load(open(tmp_path / "metrics_adapters.json"))["tasks"] == {"a": {}}


# ----------------------------------------------------------------------------- stopping and selection

@pytest.mark.parametrize("scores,patience,stop_at,best", [
    ([0.5, 0.6, 0.6, 0.55, 0.6, 0.9], 3, 5, 2),   # ties are not improvements: stop after 3 at epoch 5
    ([0.5, 0.6, 0.6, 0.55, 0.6, 0.9], 4, None, 6),
    ([0.5, 0.4, 0.7, 0.7, 0.8], 1, 2, 1),          # patience 1: the first epoch without improvement
    ([0.9, 0.1, 0.1, 0.1, 0.1], 0, None, 1),       # 0: never stop
    ([0.5, 0.5, 0.5], 2, 3, 1),                    # a tie with the first keeps the first
])
def test_dev_rule_on_scripted_scores(scores, patience, stop_at, best):
    """``afkern.train.loop.dev_rule``: stop exactly after ``patience`` dev evaluations without a
    strict improvement; the best is the first epoch that reached the maximum so far."""
    from afkern.train.loop import dev_rule

    best_acc, bad, best_epoch, stopped = float("-inf"), 0, None, None
    for epoch, acc in enumerate(scores, 1):
        improved, bad, stop = dev_rule(best_acc, bad, acc, patience)
        if improved:
            best_acc, best_epoch = acc, epoch
        if stop:
            stopped = epoch
            break
    assert stopped == stop_at and best_epoch == best


def test_training_stops_on_dev_scores_and_keeps_the_best_epoch(env, tmp_path, monkeypatch):
    """The fusion stage with scripted dev accuracies (0.5, 0.7, 0.7, 0.6, 0.9, 1.0) and patience 2:
    it stops after epoch 4, reports epoch 2 as the best, leaves epoch 2's weights in the model (not
    the last epoch's), and every score it acted on came from the dev split, not the training one."""
    from afkern.train import loop

    scripted = iter([0.5, 0.7, 0.7, 0.6, 0.9, 1.0])
    seen, states = [], []

    def evaluate(model, enc, *a, **k):
        seen.append(list(enc.input_ids))
        states.append({k: v.clone() for k, v in T.trainable_state(model).items() if isinstance(v, torch.Tensor)})
        return next(scripted)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    res = T.run(_fusion_args(env, str(tmp_path / "run"), "--epochs", "6", "--patience", "2", "--no-heatmap"))
    hist = res["metrics"]["task"]["history"]
    assert [h["dev_accuracy"] for h in hist] == [0.5, 0.7, 0.7, 0.6]
    assert res["metrics"]["task"]["best_epoch"] == 2 and res["metrics"]["task"]["best_dev_accuracy"] == 0.7
    final = T.trainable_state(res["model"])
    for k, v in states[1].items():
        assert torch.equal(final[k], v), f"{k}: not the weights of the best (dev) epoch"
    assert any(not torch.equal(states[1][k], states[3][k]) for k in states[1]), "training did not move the weights"
    with open(os.path.join(env["dirs"]["routing"], "dev.json")) as f:
        dev_text = [r["text"] for r in json.load(f)]
    tok = T.load_tokenizer(env["model"])
    want = tok(dev_text, truncation=True, max_length=24, padding=False)["input_ids"]
    assert all(s == want for s in seen), "the dev score was computed on other data than the dev split"
