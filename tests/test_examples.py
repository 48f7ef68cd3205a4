"""The scripts in examples/ run, and say what the library says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import afkern
from afkern import train as T
from afkern.train import demo_vocabulary
from conftest import perturb_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {"rte": ["x", "y"], "mrpc": ["p", "q", "r"], "sst": ["neg", "pos"]}


def _tiny_run(root):
    """A tiny model folder and an afkern-train-style fusion output folder for three targets."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    model_dir = os.path.join(root, "model")
    os.makedirs(model_dir)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + demo_vocabulary()
    with open(os.path.join(model_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=os.path.join(model_dir, "vocab.txt")).save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=50, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(model_dir)
    m = BertModel.from_pretrained(model_dir).eval()
    afkern.patch_bert(m, ["a", "b"], afkern.AdapterConfig(reduction_factor=4), fusion_config=False)
    for t in TASKS:
        afkern.add_fusion(m, t, ["a", "b"], afkern.FusionConfig.dynamic(temperature=(t == "sst")))
    perturb_(m, 0.3)
    run = os.path.join(root, "run")
    temps = {n: 20.0 for n, _ in afkern.fused_blocks(m)}
    for i, (t, labels) in enumerate(TASKS.items()):
        torch.manual_seed(i)
        d = os.path.join(run, f"fusion-{t}")
        afkern.save_adapterhub(m, d, fusions={t: "a,b"})
        head = T.ClassificationHead(24, len(labels))
        T.save_head(head, os.path.join(d, "classifier"), {"task": t, "label_names": labels, "adapters": ["a", "b"],
                                                         "fusion_temperatures": temps if t == "sst" else {}})
    return model_dir, run


def test_serve_fusions_classifies_mixed_requests_like_each_task_alone(tmp_path):
    model_dir, run = _tiny_run(str(tmp_path))
    texts = ["the soup was awful today .", "my friend said the match was superb", "what did the guide think ?",
             "the hotel felt lovely", "the telescope was boring again"]
    reqs = [(t, x) for i, x in enumerate(texts) for t in TASKS if (i + len(t)) % 2 == 0] + [("rte", texts[0])]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps({"task": t, "text": x}) for t, x in reqs) + "\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "serve_fusions.py"), "--model", model_dir,
                          "--run-dir", run, "--requests", str(path), "--batch-size", "4"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(got) == len(reqs)
    tok = T.load_tokenizer(model_dir)
    for (t, x), g in zip(reqs, got):  # each request alone, through the one-fusion path of its task
        d = os.path.join(run, f"fusion-{t}")
        clf = T.load_classifier(model_dir, [os.path.join(d, "a"), os.path.join(d, "b")], os.path.join(d, "classifier"),
                                fusion_dir=os.path.join(d, "a,b"))
        with torch.no_grad():
            p = clf(**dict(tok([x], return_tensors="pt"))).softmax(-1)[0]
        assert g["task"] == t and g["label"] == TASKS[t][int(p.argmax())]
        # printed to 4 decimals (examples/serve_fusions.py: half a unit of 1e-4), plus float32 rounding
        assert abs(g["prob"] - float(p.max())) <= 0.5e-4 + 64 * torch.finfo(torch.float32).eps
