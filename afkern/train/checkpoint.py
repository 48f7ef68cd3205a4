"""Training checkpoints: the trainable tensors, optimizer, scheduler, progress, RNG and fusion
temperatures of one task, plus a fingerprint of the settings and of the data (a content hash of
the train and dev examples and labels) that ``--resume`` must match.

A checkpoint holds only tensors, numbers and strings, is written atomically (tmp file + fsync +
``os.replace``, :mod:`afkern._io`) and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import io
import json
from typing import Dict, Mapping

import torch
import torch.nn as nn

from .._io import atomic_write_bytes
from .. import fused_blocks
from .errors import TrainError

__all__ = ["CKPT_FORMAT", "save_checkpoint", "load_checkpoint", "check_fingerprint", "trainable_state",
           "load_trainable_state", "temperatures", "set_temperatures"]

CKPT_FORMAT = "afkern-train-checkpoint-1"


def save_checkpoint(path: str, obj: dict) -> None:
    """torch.save of tensors / numbers / strings only, written atomically (tmp + os.replace)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainError(f"checkpoint {path} could not be read with weights_only=True: {exc}") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path} is not an afkern-train checkpoint (format {CKPT_FORMAT})")
    return ck


def check_fingerprint(path: str, saved: Mapping, current: Mapping) -> None:
    """Refuse to resume from a checkpoint of other data or other settings (TrainError)."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    if saved.get("data") != current.get("data"):
        was = saved.get("data") or "none recorded"
        raise TrainError(
            f"checkpoint {path} was trained on different data for task {current.get('task')!r}: the train/dev examples "
            f"or labels changed (data hash {str(was)[:12]} in the checkpoint, {str(current.get('data'))[:12]} now). "
            "Resume with the original data, or start over with --overwrite (without --resume), or use another --output-dir")
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:6])
        raise TrainError(f"checkpoint {path} was written with different settings ({diff}; {detail}); "
                         "use the same options, or start over with --overwrite (without --resume), or another --output-dir")


def trainable_state(model: nn.Module) -> Dict[str, object]:
    """Trainable tensors (cloned) plus every module's extra state (the fusion temperature)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for k, v in model.state_dict().items():
        if k in names:
            out[k] = v.detach().clone()
        elif k.endswith("_extra_state"):
            out[k] = copy.deepcopy(v)
    return out


def load_trainable_state(model: nn.Module, state: Dict[str, object]) -> None:
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise TrainError(f"checkpoint lacks trainable tensors {sorted(missing)[:5]}; was it written for another setup?")
    res = model.load_state_dict(state, strict=False)
    if res.unexpected_keys:
        raise TrainError(f"checkpoint has tensors this model lacks: {res.unexpected_keys[:5]}")


def temperatures(model: nn.Module) -> Dict[str, float]:
    """{qualified block name: current fusion softmax temperature}."""
    return {n: b.temperature for n, b in fused_blocks(model)}


def set_temperatures(model: nn.Module, temps: Mapping[str, float]) -> None:
    """Put back temperatures from :func:`temperatures` (AdapterHub anneals them in eval passes too)."""
    blocks = dict(fused_blocks(model))
    unknown = sorted(set(temps) - set(blocks))
    if unknown:
        raise TrainError(f"temperatures recorded for fused blocks {unknown[:3]} that this model lacks "
                         f"(it has {sorted(blocks)[:3]} ...); were they written for another model?")
    for n, t in temps.items():
        if blocks[n].temperature != float(t):  # only fusions with an annealed temperature ever differ from 1
            blocks[n].temperature = float(t)
