"""Backend ``reference``: the naive per-adapter layer of ``afkern.ops.reference`` (the oracle)."""

from __future__ import annotations

from ..ops.reference import fusion_layer_reference as layer
from ..ops.reference import routed_adapter_reference as routed_adapter_layer
from ..ops.reference import routed_layer_reference as routed_layer

__all__ = ["layer", "routed_layer", "routed_adapter_layer", "status"]


def status(device):
    return True, "ok"
