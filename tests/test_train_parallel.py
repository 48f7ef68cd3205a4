"""afkern-train with several tasks in one run (afkern/train/parallel.py): stage 1 ``--parallel`` and
stage 2 with several targets equal the one-task-at-a-time runs (dropout off: the same initial
weights, batches, optimizer steps and early stopping; only the padding of the mixed batches
differs), and write the same files."""

from __future__ import annotations

import json
import os

import pytest
import torch

import afkern
from afkern import train as T
from afkern.train import demo_vocabulary, make_demo_tasks, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COMMON = ["--no-progress", "--max-length", "24", "--batch-size", "16", "--eval-batch-size", "64", "--head-dropout", "0",
          "--seed", "0", "--lr", "1e-2", "--patience", "0"]


def _tiny_model(path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + demo_vocabulary()
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=os.path.join(path, "vocab.txt"), do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=50, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("par")
    model = _tiny_model(root / "model")
    sources, target = make_demo_tasks(seed=1, quick=True)
    tasks = {}
    for t, n_train in ((sources[0], 48), (sources[1], 40), (target, 24)):  # unequal sizes: unequal epochs
        d = root / "data" / t.name
        for split, text, labels in (("train", t.train_text[:n_train], t.train_labels[:n_train]),
                                    ("dev", t.dev_text[:32], t.dev_labels[:32])):
            write_jsonl(str(d / f"{split}.jsonl"), ({"text": x, "label": t.label_names[y]} for x, y in zip(text, labels)))
        tasks[t.name] = str(d)
    yield dict(root=root, model=model, tasks=tasks)
    torch.set_num_threads(n)


def _adapters(env, out, *extra, names=None):
    names = names or list(env["tasks"])[:2]
    args = ["adapters", "--model", env["model"], "--output-dir", str(out), "--epochs", "2", "--reduction-factor", "4"]
    for n in names:
        args += ["--task", f"{n}={env['tasks'][n]}"]
    return T.run(args + COMMON + list(extra))


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def _close(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **tol)


def test_parallel_adapters_equal_sequential_and_write_the_same_files(env):
    seq = _adapters(env, env["root"] / "seq")
    par = _adapters(env, env["root"] / "par", "--parallel")
    for name in list(env["tasks"])[:2]:
        a, b = seq["metrics"]["tasks"][name], par["metrics"]["tasks"][name]
        assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]]
        for ha, hb in zip(a["history"], b["history"]):
            assert abs(ha["train_loss"] - hb["train_loss"]) < 1e-4 and ha["dev_accuracy"] == hb["dev_accuracy"]
        assert a["trainable_parameters"] == b["trainable_parameters"]
        for sub, f in (("adapters", "adapter.safetensors"), ("heads", "classifier.safetensors")):
            _close(_tensors(os.path.join(env["root"] / "seq", sub, name, f)),
                   _tensors(os.path.join(env["root"] / "par", sub, name, f)), rtol=2e-4, atol=2e-5)
    # (not bit-exact: one batch of both tasks rounds the GEMMs differently from each alone, and the
    # training steps carry that rounding on; no float64 run of afkern-train to judge it against)
    # both adapters started from the same seed: training moved them apart
    n0, n1 = list(env["tasks"])[:2]
    w0 = _tensors(os.path.join(env["root"] / "par", "adapters", n0, "adapter.safetensors"))
    w1 = _tensors(os.path.join(env["root"] / "par", "adapters", n1, "adapter.safetensors"))
    k0 = next(k for k in w0 if k.endswith("adapter_down.0.weight"))
    assert (w0[k0] - w1[k0.replace(f".{n0}.", f".{n1}.")]).abs().max() > 1e-3
    for out in ("seq", "par"):
        m = json.load(open(env["root"] / out / "metrics_adapters.json"))
        assert set(m["tasks"]) == set(list(env["tasks"])[:2])
    assert par["metrics"]["parallel"]["tasks"] == list(env["tasks"])[:2]
    # the in-memory classifier of a task is its adapter alone
    view = par["models"][list(env["tasks"])[1]].eval()
    ids = torch.randint(5, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        afkern.set_active_adapter(view.encoder, view.name)
        torch.testing.assert_close(view(ids, mask), T.AdapterClassifier(view.encoder, view.head)(ids, mask), rtol=0, atol=0)


def test_several_fusion_targets_in_one_run_equal_one_at_a_time(env):
    stage1 = env["root"] / "s1"
    names = list(env["tasks"])
    _adapters(env, stage1, "--parallel", names=names[:2])
    targets = [names[2], names[0]]

    def fusion(out, tasks, *extra):
        args = ["fusion", "--model", env["model"], "--output-dir", str(out), "--adapters", str(stage1 / "adapters"),
                "--epochs", "2", "--no-heatmap"]
        for n in tasks:
            args += ["--task", f"{n}={env['tasks'][n]}"]
        return T.run(args + COMMON + list(extra))

    joint = fusion(env["root"] / "f-joint", targets, "--prune-k", "1")
    for t in targets:
        alone = fusion(env["root"] / f"f-{t}", [t], "--prune-k", "1")
        a, b = alone["metrics"]["task"], joint["metrics"][t]["task"]
        assert [h["dev_accuracy"] for h in a["history"]] == [h["dev_accuracy"] for h in b["history"]]
        fa = os.path.join(env["root"] / f"f-{t}", f"fusion-{t}")
        fb = os.path.join(env["root"] / "f-joint", f"fusion-{t}")
        assert sorted(os.listdir(fa)) == sorted(os.listdir(fb))
        # one target after another in one process: the same computation, bit for bit
        _close(_tensors(os.path.join(fa, ",".join(joint["names"]), "model_adapter_fusion.safetensors")),
               _tensors(os.path.join(fb, ",".join(joint["names"]), "model_adapter_fusion.safetensors")), rtol=0, atol=0)
        mj = json.load(open(env["root"] / "f-joint" / "metrics_fusion.json"))
        assert t in mj["targets"] and "pruning" in mj["targets"][t]
    # a saved target reloads through the usual path and equals its joint-run classifier
    t = targets[0]
    m = joint["metrics"][t]
    clf = T.load_classifier(env["model"], m["saved_adapter_dirs"], m["head_dir"], fusion_dir=m["fusion_dir"])
    ids = torch.randint(5, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(clf(ids, mask), joint["models"][t].eval()(ids, mask))


def test_joint_runs_refuse_what_they_do_not_support(env, capsys):
    rc = T.main(["adapters", "--model", env["model"], "--output-dir", str(env["root"] / "x"), "--parallel",
                 "--task", f"a={list(env['tasks'].values())[0]}", "--save-every", "3"] + COMMON)
    assert rc == 2 and "--save-every" in capsys.readouterr().err
    assert not os.path.exists(env["root"] / "x" / "adapters")
