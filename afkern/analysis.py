"""Fusion weights for analysis: which adapters each layer attends to (the paper's Figure 4)."""

from __future__ import annotations


from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from ._io import atomic_save_png
from .model import fused_blocks

__all__ = ["record_fusion_weights", "fusion_weights", "plot_fusion_weights"]


def record_fusion_weights(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every fused block keep the softmax weights of its last forward (``block.fusion_weights``,
    [..., N], detached, on the device: no host sync)."""
    for _, b in fused_blocks(model):
        b.record_fusion_weights = enabled
        if not enabled:
            b.fusion_weights = None
    return model


def fusion_weights(model: nn.Module, mask: Optional[torch.Tensor] = None,
                   fusion: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """{block name: mean fusion weight per adapter [N]} from the last recorded forward.

    ``mask`` [batch, seq] (an attention mask) restricts the mean to real tokens. ``fusion``: the
    mean over the tokens that ran through that fusion, per adapter of that fusion (in its order);
    after a routed forward (``afkern.route``) the recorded weights are [..., N] over all of the
    block's adapters, 0 outside each token's fusion, and ``fusion`` picks one. Tensors stay on
    their device; nothing is synchronised.
    """
    out = {}
    for name, b in fused_blocks(model):
        w = b.fusion_weights
        if w is None:
            continue
        rec = b.fusion_route
        routed = rec is not None and rec.weights is w
        flat = w.reshape(-1, w.shape[-1])
        if mask is not None:
            if mask.numel() != flat.shape[0]:
                raise ValueError(f"mask {tuple(mask.shape)} does not match the {tuple(w.shape[:-1])} tokens of {name}'s last forward")
            m = mask.to(device=w.device, dtype=w.dtype).reshape(-1)
        else:
            m = torch.ones(flat.shape[0], device=w.device, dtype=w.dtype)
        if fusion is not None:
            if fusion not in b.fusions:
                raise ValueError(f"unknown fusion {fusion!r}; {name} has fusions {list(b.fusions)}")
            if routed:
                m = m * rec.token_mask(fusion).to(m.dtype)
                flat = flat[:, [b.adapter_names.index(n) for n in b.fusions[fusion].adapter_names]]
            elif fusion != b.active_fusion:
                raise ValueError(f"{name}'s last recorded forward ran fusion {b.active_fusion!r}, not {fusion!r}")
        out[name] = (flat * m.unsqueeze(-1)).sum(0) / m.sum().clamp_min(1)
    return out


def plot_fusion_weights(weights: Dict[str, torch.Tensor], adapter_names: Sequence[str], path: str, title: str = "") -> str:
    """Heatmap (layers x adapters) of mean fusion weights, written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not weights:
        raise ValueError("no fusion weights to plot; run a forward with record_fusion_weights(model) first")
    rows = list(weights)
    data = torch.stack([weights[k].detach().float().cpu() for k in rows]).numpy()
    if data.shape[1] != len(adapter_names):
        raise ValueError(f"weights have {data.shape[1]} adapters but {len(adapter_names)} names were given: {list(adapter_names)}")
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(adapter_names), 1.0 + 0.35 * len(rows)))
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(adapter_names)), list(adapter_names), rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [r.replace("encoder.layer.", "L").replace(".output", "") for r in rows])
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color="w" if data[i, j] < 0.5 else "k", fontsize=7)
    fig.colorbar(im, ax=ax, label="mean fusion weight")
    ax.set_title(title or "AdapterFusion weights per layer")
    fig.tight_layout()
    return atomic_save_png(fig, path)
