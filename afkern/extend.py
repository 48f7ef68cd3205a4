"""Adding adapters to a patched model: :func:`add_adapters`.

Each fused block is rebuilt with its adapters followed by the new ones (the stacked ``[N, ...]``
parameters grow to ``[N + K, ...]``); the existing adapters, every fusion (query, key, value,
config, temperature, score dropout, control, ``requires_grad``) and the active setup are carried
over, so the model computes exactly what it did. The new adapters start as AdapterHub initialises
a new adapter. A fusion over them is then added with :func:`afkern.add_fusion`.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Sequence

import torch
import torch.nn as nn

from .block import _ADAPTER_PARAMS, FusedAdapterBlock, check_adapter_names
from .config import load_adapter_config
from .model import blocks_of, fused_blocks, replace_blocks

__all__ = ["add_adapters", "with_adapters"]

# The AdapterConfig fields that only say how a new adapter starts; all others must match the block's.
_INIT_FIELDS = ("init_weights", "init_weights_seed")


def _same_computation(a, b) -> Dict[str, tuple]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k: (da[k], db[k]) for k in da if k not in _INIT_FIELDS and da[k] != db[k]}


@torch.no_grad()
def with_adapters(block: FusedAdapterBlock, names: Sequence[str], adapter_config=None) -> FusedAdapterBlock:
    """A new block holding ``block``'s adapters and then ``names`` (initialised as AdapterHub does,
    with ``adapter_config``'s ``init_weights`` / ``init_weights_seed``), with every fusion and the
    active setup of ``block``. The wrapped dense / LayerNorm / dropout (or the site's norm) are
    shared with ``block``, as :meth:`FusedAdapterBlock.select_adapters` shares them."""
    names = check_adapter_names(names)
    taken = [n for n in names if n in block.adapter_names]
    if taken:
        raise ValueError(f"adapters {taken} exist already; the block has {block.adapter_names}")
    cfg = block.adapter_config if adapter_config is None else load_adapter_config(adapter_config)
    new = block.sibling(block.adapter_names + names)
    n_old = block.n_adapters
    # the new adapters start as AdapterHub starts one, with the init settings of adapter_config
    init_cfg = dataclasses.replace(block.adapter_config, **{k: getattr(cfg, k) for k in _INIT_FIELDS})
    new.adapter_config = init_cfg
    new.reset_adapters()
    new.adapter_config = block.adapter_config
    for pname in _ADAPTER_PARAMS:
        src, dst = getattr(block, pname), getattr(new, pname)
        dst[:n_old].copy_(src)
        dst.requires_grad_(src.requires_grad)
    for k, f in block.fusions.items():
        nf = new.add_fusion(k, f.adapter_names, f.config, score_dropout=f.score_dropout)
        nf.load_state_dict(f.state_dict())
        for p_src, p_dst in zip(f.parameters(), nf.parameters()):
            p_dst.requires_grad_(p_src.requires_grad)
        nf.control = getattr(f, "control", None)
    if block.active_fusion is not None:
        new.set_active_fusion(block.active_fusion)
    else:
        new.set_active_adapter(block.active_adapter)
    new.record_fusion_weights = block.record_fusion_weights
    new.train(block.training)
    return new


def add_adapters(model: nn.Module, adapter_names: Sequence[str], adapter_config=None) -> nn.Module:
    """Add adapters ``adapter_names`` to every fused block of a patched ``model``, in place.

    They sit where the model's adapters sit, with the same width (bottleneck) and activation, and
    start as AdapterHub initialises a new adapter; ``adapter_config`` (default: the model's) may
    differ from the model's only in ``init_weights`` / ``init_weights_seed``. Existing adapters,
    fusions and the active setup are unchanged, so the outputs are too; the new adapters take no
    part until a setup uses them (``afkern.set_active_adapter`` to train one alone, then
    ``afkern.add_fusion`` / ``afkern.set_active_fusion``). The stacked adapter parameters keep
    their ``requires_grad``. Every block is checked and built before any is swapped in. Returns ``model``.
    """
    names = check_adapter_names(adapter_names)
    if isinstance(model, FusedAdapterBlock):
        raise TypeError("add_adapters works on a model; for a single block use afkern.extend.with_adapters(block, names)")
    blocks = blocks_of(model, "add_adapters")
    if adapter_config is not None:
        cfg = load_adapter_config(adapter_config)
        diff = _same_computation(blocks[0].adapter_config, cfg)
        if diff:
            raise ValueError(
                "added adapters share the model's placement and width; adapter_config differs in "
                + ", ".join(f"{k}={new!r} (the model's: {old!r})" for k, (old, new) in sorted(diff.items()))
            )
    else:
        cfg = None
    for q, b in fused_blocks(model):
        taken = [n for n in names if n in b.adapter_names]
        if taken:
            raise ValueError(f"adapters {taken} exist already in {q}, which has {b.adapter_names}")
    new = {q: with_adapters(b, names, cfg) for q, b in fused_blocks(model)}
    return replace_blocks(model, new)
