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
from afkern.data import DataError, load_task, make_demo_tasks, demo_vocabulary, read_records, write_jsonl

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
        assert abs(sum(w.values()) - 1.0) < 1e-4, (layer, w)
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
        torch.testing.assert_close(hub(**batch).last_hidden_state, ref, rtol=1e-5, atol=1e-6)


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
    extra = [v for k, v in ck["state"].items() if k.endswith("_extra_state")]
    assert len(extra) == 2 and all(v[0].item() == pytest.approx(t_expect) for v in extra)  # [temperature, active]
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
    full = afkern.FusedAdapterBlock(d, ["a", "b", "c"], afkern.AdapterConfig(reduction_factor=8), in_features=56,
                                    dtype=torch.float64).eval()
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.3)
    full.temperature = 3.0
    pruned = T.prune_block(full, keep)
    ks = sorted(keep)
    assert pruned.adapter_names == [full.adapter_names[i] for i in ks] and pruned.temperature == 3.0
    expect = afkern.FusedAdapterBlock(d, pruned.adapter_names, afkern.AdapterConfig(reduction_factor=8), in_features=56,
                                      dtype=torch.float64).eval()
    expect.load_state_dict({k: v for k, v in full.state_dict().items()
                            if not k.startswith(("down_", "up_")) and not k.endswith("_extra_state")}, strict=False)
    for j, i in enumerate(ks):
        st = full.adapter_state(i)
        expect.set_adapter_weights(j, st["adapter_down.0.weight"], st["adapter_down.0.bias"], st["adapter_up.weight"],
                                   st["adapter_up.bias"])
    expect.temperature = 3.0
    h, x = torch.randn(7, 56, dtype=torch.float64), torch.randn(7, d, dtype=torch.float64)
    for b in (pruned, expect, full):
        b.set_backend("reference")
    torch.testing.assert_close(pruned(h, x), expect(h, x), rtol=1e-12, atol=1e-12)
    if len(ks) == N:
        torch.testing.assert_close(pruned(h, x), full(h, x), rtol=1e-12, atol=1e-12)
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
    assert set(sub.choices) == {"adapters", "fusion", "demo"}
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
