"""What is checked before any training starts, besides the data and the model: the optional
packages a command needs, and that the output directory holds no earlier results the run would
replace (unless ``--overwrite``, or ``--resume`` with their checkpoints)."""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Sequence

from .errors import TrainError
from .metrics import ADAPTER_METRICS, DEMO_METRICS, FUSION_METRICS, read_metrics

__all__ = ["check_extras", "adapter_outputs", "fusion_outputs", "check_outputs", "EXTRA_HINT"]

EXTRA_HINT = 'pip install "afkern[train]"'


def check_extras(cfg) -> None:
    """TrainError naming ``pip install "afkern[train]"`` if a package the command needs is missing."""
    needs: List[tuple] = []
    if cfg.command in ("fusion", "demo") and not getattr(cfg, "no_heatmap", False):
        needs.append(("matplotlib", "the heatmap of the fusion weights", "--no-heatmap"))
    missing = [(m, why, alt) for m, why, alt in needs if importlib.util.find_spec(m) is None]
    if missing:
        parts = "; ".join(f"`{m}` for {why} (or pass {alt} to skip it)" for m, why, alt in missing)
        raise TrainError(f"afkern-train {cfg.command} needs {parts}, which is not installed. "
                         f"Install the training extras with: {EXTRA_HINT}")


def adapter_outputs(out_dir: str, task: str) -> Dict[str, List[str]]:
    """{"checkpoint": [...], "outputs": [...]} that stage 1 writes for ``task``."""
    return {"checkpoint": [os.path.join(out_dir, "checkpoints", f"adapters-{task}.pt")],
            "outputs": [os.path.join(out_dir, "adapters", task), os.path.join(out_dir, "heads", task)]}


def fusion_outputs(out_dir: str, task: str) -> Dict[str, List[str]]:
    """The same for stage 2 on target ``task``."""
    return {"checkpoint": [os.path.join(out_dir, "checkpoints", f"fusion-{task}.pt")],
            "outputs": [os.path.join(out_dir, f"fusion-{task}"), os.path.join(out_dir, f"fusion_weights-{task}.png")]}


def check_outputs(cfg, units: Sequence[Dict[str, List[str]]], extra: Sequence[str] = ()) -> None:
    """Refuse (TrainError) if any unit's results already exist in ``--output-dir`` and the run would
    replace them: without ``--overwrite`` that is allowed only with ``--resume`` from the unit's own
    checkpoint. ``extra``: more paths the run rewrites (the demo's data and summary). Existing
    metrics files must be readable, since they are merged into rather than replaced."""
    if cfg.overwrite:
        return
    found: List[str] = []
    for u in units:
        ckpt = [p for p in u["checkpoint"] if os.path.exists(p)]
        outs = [p for p in u["outputs"] if os.path.exists(p)]
        if cfg.resume and ckpt:
            continue  # resuming that unit: the checkpoint's fingerprint is checked when it is read
        found += ckpt + outs
    if not cfg.resume:
        found += [p for p in extra if os.path.exists(p)]
    if found:
        shown = ", ".join(os.path.relpath(p, cfg.output_dir) for p in found[:6]) + (" ..." if len(found) > 6 else "")
        raise TrainError(f"--output-dir {cfg.output_dir} already holds results of an earlier run that this one would "
                         f"replace ({shown}); nothing was changed. Continue that run with --resume, replace them with "
                         "--overwrite, or choose another --output-dir")
    for name in (ADAPTER_METRICS, FUSION_METRICS, DEMO_METRICS):
        read_metrics(os.path.join(cfg.output_dir, name))
