"""The metrics files of a run (``metrics_adapters.json``, ``metrics_fusion.json``,
``metrics_demo.json``), written atomically. Runs into the same output directory add to these files
instead of replacing them: stage 1 keeps one record per task, stage 2 one per target task (under
``"targets"``; the top level describes the latest run)."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from .. import __version__
from .._io import atomic_write_json
from .data import TaskData
from .demo_data import GENERATED_NOTE
from .dist import Dist
from .errors import TrainError

__all__ = ["env_info", "settings", "task_record", "data_note", "read_metrics", "write_adapter_metrics",
           "write_fusion_metrics", "ADAPTER_METRICS", "FUSION_METRICS", "DEMO_METRICS"]

ADAPTER_METRICS, FUSION_METRICS, DEMO_METRICS = "metrics_adapters.json", "metrics_fusion.json", "metrics_demo.json"


def env_info(d: Dist) -> dict:
    dev = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
    return {"afkern_version": __version__, "torch": torch.__version__, "device": dev, "world_size": d.world}


def settings(cfg) -> dict:
    """The command-line options of the run, as JSON."""
    return json.loads(json.dumps({k: v for k, v in vars(cfg).items() if k not in ("func",)}, default=str))


def data_note(tasks: Sequence[TaskData]) -> Optional[str]:
    return GENERATED_NOTE if any(t.generated for t in tasks) else None


def task_record(t: TaskData) -> dict:
    return {"name": t.name, "source": t.source, "generated": t.generated, "labels": t.label_names,
            "n_train": len(t.train_text), "n_dev": len(t.dev_text), "data_sha256": t.fingerprint()}


def read_metrics(path: str) -> Optional[dict]:
    """The metrics file at ``path`` (None if there is none); TrainError if it is not a JSON object."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path} exists but is not readable JSON ({exc}); afkern-train adds to it rather than "
                         "replacing it: move it away, or use --overwrite to start it afresh") from None
    if not isinstance(obj, dict):
        raise TrainError(f"{path} is not a metrics object; move it away, or use --overwrite to start it afresh")
    return obj


def _old(path: str, overwrite: bool) -> dict:
    try:
        return read_metrics(path) or {}
    except TrainError:
        if overwrite:
            return {}
        raise


def write_adapter_metrics(out_dir: str, metrics: dict, overwrite: bool = False) -> dict:
    """Merge this run's ``metrics["tasks"]`` into ``metrics_adapters.json``: the other tasks' records
    stay; a task trained again is replaced. Returns what was written."""
    path = os.path.join(out_dir, ADAPTER_METRICS)
    old = _old(path, overwrite)
    tasks = dict(old.get("tasks") or {})
    tasks.update(metrics["tasks"])
    merged = dict(old, **metrics)
    merged["tasks"] = tasks
    merged["data_note"] = GENERATED_NOTE if any(r.get("generated") for r in tasks.values()) else None
    atomic_write_json(path, merged)
    return merged


def _target_name(m: dict) -> str:
    """The target task of a fusion run's metrics (older files name it only in ``fusion_dir``)."""
    name = m["task"].get("name")
    if name:
        return name
    parent = os.path.basename(os.path.dirname(str(m.get("fusion_dir") or "")))
    return parent[len("fusion-"):] if parent.startswith("fusion-") else "earlier run"


def write_fusion_metrics(out_dir: str, metrics: dict, overwrite: bool = False) -> dict:
    """Write this fusion run as the top level of ``metrics_fusion.json`` and as
    ``"targets"[<task>]``, keeping the earlier runs' targets. Returns what was written."""
    path = os.path.join(out_dir, FUSION_METRICS)
    old = _old(path, overwrite)
    targets = dict(old.get("targets") or {})
    if not targets and isinstance(old.get("task"), dict):  # a file from before "targets" existed
        targets[_target_name(old)] = old
    run = {k: v for k, v in metrics.items() if k != "targets"}
    targets[metrics["task"]["name"]] = run
    merged = dict(run, targets=targets)
    atomic_write_json(path, merged)
    return merged
