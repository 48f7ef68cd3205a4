"""Pruning a trained fusion to the k adapters each layer uses most (AdapterDrop's outlook), and the
file that makes a pruned model reloadable.

A pruned model is stored next to the fusion it came from: the AdapterHub directories of the full
fusion plus ``pruned-k<k>.json``, which names the adapters each block keeps and the blocks' fusion
temperatures; :func:`afkern.train.load_classifier` with ``pruned=`` rebuilds it exactly.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .. import FusedAdapterBlock, fused_blocks
from .._io import atomic_write_json
from ..model import replace_blocks
from .checkpoint import set_temperatures, temperatures
from .errors import TrainError

__all__ = ["prune_block", "prune_model", "most_used", "save_pruned", "load_pruned_spec", "apply_pruned", "timed_passes",
           "pruning_report", "PRUNED_FORMAT"]

PRUNED_FORMAT = "afkern-pruned-fusion-1"
Keep = Union[Sequence[int], Sequence[str]]


def _names(block: FusedAdapterBlock, keep: Keep, where: str = "") -> List[str]:
    keep = list(keep)
    if not keep:
        raise ValueError(f"prune_block needs at least one adapter index to keep{where}")
    if all(isinstance(k, str) for k in keep):
        unknown = [k for k in keep if k not in block.adapter_names]
        if unknown:
            raise ValueError(f"adapters {unknown} are not in the block{where} (it has {block.adapter_names})")
        return keep
    idx = sorted({int(i) for i in keep})
    if idx[0] < 0 or idx[-1] >= block.n_adapters:
        raise ValueError(f"keep indices {idx} out of range for a block with {block.n_adapters} adapters{where}")
    return [block.adapter_names[i] for i in idx]


def prune_block(block: FusedAdapterBlock, keep: Keep) -> FusedAdapterBlock:
    """A new block holding only some adapters of ``block``: ``keep`` as indices (kept in the
    block's order) or names (in the given order). Dense / LayerNorm / dropout are shared, the
    fusion's query, key, value and temperature copied; the softmax runs over the kept adapters."""
    return block.select_adapters(_names(block, keep))


def prune_model(model: nn.Module, keep: Mapping[str, Keep]) -> nn.Module:
    """Replace each fused block named in ``keep`` ({qualified name: indices or names}) by
    :func:`prune_block`, in place; every new block is built before any is swapped in, so an error
    leaves ``model`` untouched. Returns ``model``."""
    blocks = dict(fused_blocks(model))
    unknown = sorted(set(keep) - set(blocks))
    if unknown:
        raise ValueError(f"no fused blocks named {unknown}; the model has {sorted(blocks)}")
    new = {name: blocks[name].select_adapters(_names(blocks[name], k, f" {name}")) for name, k in keep.items()}
    return replace_blocks(model, new)


def most_used(weights: Mapping[str, torch.Tensor], k: int) -> Dict[str, List[int]]:
    """{block: indices of its ``k`` largest mean fusion weights, ascending}."""
    return {name: sorted(torch.topk(w, k).indices.tolist()) for name, w in weights.items()}


def save_pruned(path: str, model: nn.Module, k: int, adapters: Sequence[str], fusion_dir: str) -> str:
    """Write ``pruned-k<k>.json``: the adapters each block of the pruned ``model`` keeps, its
    temperatures, and (relative to ``path``'s folder) the full fusion it was cut from."""
    blocks = dict(fused_blocks(model))
    atomic_write_json(path, {
        "format": PRUNED_FORMAT, "k": k, "adapters": list(adapters),
        "fusion_dir": os.path.relpath(fusion_dir, os.path.dirname(os.path.abspath(path))),
        "kept": {name: list(b.adapter_names) for name, b in blocks.items()},
        "temperatures": temperatures(model),
    })
    return path


def load_pruned_spec(pruned: Union[str, Mapping]) -> dict:
    """The content of a ``pruned-k<k>.json`` (a path, or the dict itself), checked."""
    if isinstance(pruned, Mapping):
        spec = dict(pruned)
    else:
        try:
            with open(pruned) as f:
                spec = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainError(f"pruned-model file {pruned} could not be read: {exc}") from None
    if spec.get("format") != PRUNED_FORMAT or not isinstance(spec.get("kept"), Mapping):
        raise TrainError(f"{pruned} is not an afkern-train pruned-model file (format {PRUNED_FORMAT})")
    return spec


def apply_pruned(encoder: nn.Module, pruned: Union[str, Mapping]) -> nn.Module:
    """Prune a freshly loaded full-fusion ``encoder`` as ``pruned`` says; returns it."""
    spec = load_pruned_spec(pruned)
    blocks = list(fused_blocks(encoder))
    if not blocks:
        raise TrainError("the model to prune has no fused blocks (load the full fusion first)")
    have = list(blocks[0][1].adapter_names)
    if spec.get("adapters") and list(spec["adapters"]) != have:
        raise TrainError(f"the pruned model was cut from a fusion of {spec['adapters']}, but the loaded fusion has {have}")
    try:
        prune_model(encoder, spec["kept"])
    except ValueError as exc:
        raise TrainError(f"pruned model: {exc}") from None
    set_temperatures(encoder, spec.get("temperatures") or {})
    return encoder


def timed_passes(evaluate_fn, models: Mapping[str, nn.Module], repeats: int = 3) -> Dict[str, List[tuple]]:
    """{key: [(accuracy, seconds), ...]} of ``repeats`` interleaved passes of every model."""
    runs: Dict[str, List[tuple]] = {k: [] for k in models}
    for _ in range(repeats):  # interleaved: less sensitive to a busy machine
        for key, m in models.items():
            runs[key].append(evaluate_fn(m))
    return runs


def pruning_report(k: int, keep: Mapping[str, Sequence[int]], names: Sequence[str], runs: Mapping[str, List[tuple]],
                   saved: Optional[str]) -> dict:
    acc_full, acc_pruned = runs["full"][0][0], runs["pruned"][0][0]
    t_full, t_pruned = min(t for _, t in runs["full"]), min(t for _, t in runs["pruned"])
    return {
        "k": k, "kept": {b: [names[i] for i in v] for b, v in keep.items()},
        "dev_accuracy_full": acc_full, "dev_accuracy_pruned": acc_pruned,
        "dev_eval_seconds_full": t_full, "dev_eval_seconds_pruned": t_pruned,
        "timing": f"best of {len(runs['full'])} interleaved dev passes, this process",
        "speedup": t_full / max(t_pruned, 1e-12), "saved": saved,
    }
