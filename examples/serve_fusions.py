"""Serve several AdapterFusion tasks from one model: mixed (task, text) requests, one forward per batch.

    python examples/serve_fusions.py --model MODEL_DIR --run-dir OUT --requests requests.jsonl

``OUT`` holds what ``afkern-train fusion`` wrote for each target task (``OUT/fusion-<task>/`` with
the adapters, the fusion ``a,b,c/`` and the ``classifier/`` head); ``requests.jsonl`` has one
``{"task": ..., "text": ...}`` per line (``-`` reads stdin). The adapters are loaded once, the K
fusion directories under their task names (``afkern.load_adapterhub(..., fusion_dir={task: dir})``:
AdapterHub itself names all of them "a,b,c"), and every batch of requests, whatever its mix of
tasks, is one forward with each sequence routed to its task's fusion (``afkern.route``); each
task's head reads its own rows. Prints one JSON line per request: task, label, probability.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Sequence, Tuple

import torch

import afkern
from afkern.train import load_head, load_tokenizer


def load_server(model_dir: str, run_dir: str, backend: str = "auto"):
    """(encoder with one fusion per task, {task: (head, meta)}, tokenizer) from afkern-train outputs."""
    from transformers import AutoModel

    tasks = sorted(d[len("fusion-"):] for d in os.listdir(run_dir)
                   if d.startswith("fusion-") and os.path.isdir(os.path.join(run_dir, d)))
    if not tasks:
        raise SystemExit(f"{run_dir} holds no fusion-<task>/ folders (afkern-train fusion outputs)")
    heads, fusion_dirs, adapter_dirs = {}, {}, None
    for t in tasks:
        root = os.path.join(run_dir, f"fusion-{t}")
        head, meta = load_head(os.path.join(root, "classifier"))
        heads[t] = (head.eval(), meta)
        fusion_dirs[t] = os.path.join(root, ",".join(meta["adapters"]))
        if adapter_dirs is None:  # every target fuses the same stage-1 adapters: load them once
            adapter_dirs = [os.path.join(root, a) for a in meta["adapters"]]
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    afkern.load_adapterhub(model, adapter_dirs, fusion_dir=fusion_dirs, backend=backend)
    blocks = dict(afkern.fused_blocks(model))
    for t, (_, meta) in heads.items():  # the annealed temperatures the heads were trained with
        for name, temp in (meta.get("fusion_temperatures") or {}).items():
            if float(temp) != 1.0:
                blocks[name].fusions[t].temperature = float(temp)
    return model, heads, load_tokenizer(model_dir)


@torch.no_grad()
def classify(model, heads, tokenizer, requests: Sequence[Tuple[str, str]], batch_size: int = 32,
             max_length: int = 128) -> List[dict]:
    """Labels for (task, text) requests, in order; each batch is one routed forward."""
    unknown = sorted({t for t, _ in requests} - set(heads))
    if unknown:
        raise ValueError(f"requests name unknown tasks {unknown}; served: {sorted(heads)}")
    out: List[dict] = []
    for i in range(0, len(requests), batch_size):
        chunk = requests[i:i + batch_size]
        enc = tokenizer([x for _, x in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tasks = [t for t, _ in chunk]
        # AdapterHub anneals a temperature fusion's softmax in eval too; a server keeps the trained one
        temps = [(f, f.temperature) for _, b in afkern.fused_blocks(model) for f in b.fusions.values()]
        with afkern.route(model, fusion=tasks):
            hidden = model(**enc).last_hidden_state
        for f, temp in temps:
            f.temperature = temp
        for t in dict.fromkeys(tasks):
            rows = torch.tensor([j for j, tj in enumerate(tasks) if tj == t])
            head, meta = heads[t]
            probs = head(hidden[rows], enc["attention_mask"][rows]).softmax(-1)
            for j, pr in zip(rows.tolist(), probs):
                k = int(pr.argmax())
                out.append((i + j, {"task": t, "label": meta["label_names"][k], "prob": round(float(pr[k]), 4)}))
    return [r for _, r in sorted(out, key=lambda x: x[0])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the base transformers checkpoint folder the adapters were trained on")
    p.add_argument("--run-dir", required=True, help="afkern-train fusion output folder (fusion-<task>/ per task)")
    p.add_argument("--requests", default="-", help='JSON lines {"task": ..., "text": ...}; "-" for stdin')
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    model, heads, tok = load_server(args.model, args.run_dir, args.backend)
    f = sys.stdin if args.requests == "-" else open(args.requests)
    reqs = [(r["task"], r["text"]) for r in map(json.loads, filter(str.strip, f))]
    for r in classify(model, heads, tok, reqs, args.batch_size):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
