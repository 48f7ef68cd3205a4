"""Backend ``reference``: the naive per-adapter layer of ``afkern.ops.reference`` (the oracle)."""

from __future__ import annotations

from ..ops.reference import fusion_layer_reference as layer

__all__ = ["layer", "status"]


def status(device):
    return True, "ok"
