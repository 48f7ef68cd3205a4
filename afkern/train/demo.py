"""``afkern-train demo``: both stages on small GENERATED tasks (:mod:`.demo_data`): adapters for
three source tasks and the small target, then the fusion on the target, with a summary that
compares the target's single adapter with the fusion (and its pruned form)."""

from __future__ import annotations

import copy
import os
import time

from .._io import atomic_write_json
from .demo_data import GENERATED_NOTE, make_demo_tasks
from .data import write_jsonl
from .dist import Dist, barrier, log
from .metrics import DEMO_METRICS, settings
from .preflight import adapter_outputs, check_outputs, fusion_outputs
from .stages import PAPER, adapter_fingerprint, check_resumable, train_adapters, train_fusion

__all__ = ["run_demo", "DEMO_PRESET"]

DEMO_PRESET = {
    True: dict(batch_size=8, max_length=32, adapter_lr=1e-3, fusion_lr=1e-3, head_lr=2e-3, adapter_epochs=2,
               fusion_epochs=6, patience=0),
    False: dict(batch_size=32, max_length=48, adapter_lr=5e-4, fusion_lr=5e-4, head_lr=1e-3, adapter_epochs=10,
                fusion_epochs=10, patience=3),
}


def run_demo(cfg, d: Dist) -> dict:
    t_start = time.perf_counter()
    preset = DEMO_PRESET[bool(cfg.quick)]
    for k in ("batch_size", "max_length", "patience", "head_lr"):
        if getattr(cfg, k) is None:
            setattr(cfg, k, preset[k])
    sources, target = make_demo_tasks(cfg.seed, quick=cfg.quick)
    # stage 1 runs on the sources and on the target itself (the paper fuses the target's own adapter too)
    c1 = copy.copy(cfg)
    c1.lr = cfg.adapter_lr or preset["adapter_lr"]
    c1.epochs = cfg.adapter_epochs or preset["adapter_epochs"]
    # the target's own adapter is the single-adapter baseline: as many epochs as the fusion gets
    c1t = copy.copy(c1)
    c1t.epochs = max(c1.epochs, cfg.fusion_epochs or preset["fusion_epochs"])
    c2 = copy.copy(cfg)
    c2.lr = cfg.fusion_lr or preset["fusion_lr"]
    c2.epochs = cfg.fusion_epochs or preset["fusion_epochs"]
    out_dir = cfg.output_dir
    check_outputs(cfg, [adapter_outputs(out_dir, t.name) for t in sources + [target]] + [fusion_outputs(out_dir, target.name)],
                  extra=[os.path.join(out_dir, "data"), os.path.join(out_dir, DEMO_METRICS)])
    check_resumable(cfg, [(adapter_outputs(out_dir, t.name)["checkpoint"][0], adapter_fingerprint(c, t))
                          for c, t in [(c1, s) for s in sources] + [(c1t, target)]])
    barrier(d)
    log(d, "=" * 78 + f"\nafkern-train demo: {GENERATED_NOTE}\n" + "=" * 78)
    if d.main:
        for t in sources + [target]:
            for split, text, labels in (("train", t.train_text, t.train_labels), ("dev", t.dev_text, t.dev_labels)):
                write_jsonl(os.path.join(out_dir, "data", t.name, f"{split}.jsonl"),
                            ({"text": x, "label": t.label_names[y], "generated": True} for x, y in zip(text, labels)))
            log(d, f"  {t.summary()}  e.g. {t.train_text[0]!r} -> {t.label_names[t.train_labels[0]]}")
    barrier(d)
    log(d, f"\n== stage 1: single-task adapters (lr {c1.lr}, head lr {c1.head_lr}, up to {c1.epochs} epochs; "
           f"paper: lr {PAPER['adapter_lr']}, 30 epochs; the demo uses larger rates to converge in few steps)")
    s1 = train_adapters(c1, sources, d)
    if s1.get("interrupted"):
        return s1
    log(d, f"\n== stage 1 for the target {target.name}: its own adapter, up to {c1t.epochs} epochs (as many as the fusion)")
    s1t = train_adapters(c1t, [target], d)
    if s1t.get("interrupted"):
        return s1t
    s1["metrics"]["tasks"].update(s1t["metrics"]["tasks"])
    s1["metrics"]["settings_target"] = s1t["metrics"]["settings"]
    log(d, f"\n== stage 2: AdapterFusion on {target.name} (lr {c2.lr}, head lr {c2.head_lr}, up to {c2.epochs} epochs; "
           f"paper: lr {PAPER['fusion_lr']}, 10 epochs)")
    adirs = [os.path.join(out_dir, "adapters", t.name) for t in sources + [target]]
    s2 = train_fusion(c2, target, adirs, d)
    if s2.get("interrupted"):
        return s2
    wall = time.perf_counter() - t_start
    if d.main:
        single = s1["metrics"]["tasks"][target.name]["best_dev_accuracy"]
        fused = s2["metrics"]["task"]["best_dev_accuracy"]
        summary = {"data_note": GENERATED_NOTE, "target": target.name, "sources": [t.name for t in sources],
                   "single_adapter_dev_accuracy": single, "fusion_dev_accuracy": fused,
                   "source_dev_accuracy": {t.name: s1["metrics"]["tasks"][t.name]["best_dev_accuracy"] for t in sources},
                   "pruning": s2["metrics"].get("pruning"), "wall_time_s": wall, "quick": bool(cfg.quick),
                   "device": s2["metrics"]["device"], "settings": settings(cfg)}
        atomic_write_json(os.path.join(out_dir, DEMO_METRICS), summary)
        lines = ["", "=" * 78, f"demo summary (GENERATED data, target {target.name!r}, {len(target.train_text)} training examples)",
                 f"  single-task adapter on {target.name}: dev accuracy {single:.4f}",
                 f"  AdapterFusion of {s2['names']}: dev accuracy {fused:.4f}"]
        if s2["metrics"].get("pruning"):
            pr = s2["metrics"]["pruning"]
            lines.append(f"  fusion pruned to k={pr['k']} per layer: dev accuracy {pr['dev_accuracy_pruned']:.4f}, "
                         f"inference {pr['speedup']:.2f}x (saved: {os.path.relpath(pr['saved'], out_dir)})")
        files = ", ".join([DEMO_METRICS] + ([os.path.basename(s2["metrics"]["heatmap"])] if s2["metrics"].get("heatmap") else []))
        lines += [f"  wall time {wall:.0f} s; outputs in {out_dir} ({files})", "=" * 78]
        log(d, "\n".join(lines))
        s2["summary"] = summary
    return {"stage1": s1, "stage2": s2}
