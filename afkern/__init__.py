"""afkern: fused kernels for AdapterFusion (Pfeiffer et al., 2021).

N bottleneck adapters and their fusion attention as a few batched GEMMs and one row op,
exactly equal to AdapterHub's ``adapters`` implementation, at the adapter sites of every model
family AdapterHub fuses; several named fusions per model, routed per sequence in one batch.
"""

from ._version import __version__

from .ops.limits import KERNEL_ACTIVATIONS
from .backends import available_backends, resolve_backend
from .block import FusedAdapterBlock
from .config import AdapterConfig, FusionConfig
from .model import fused_blocks, fusion_regularization_loss, set_active_adapter, set_backend
from .patching import patch_bert, patch_model
from .adapterhub import from_adapterhub, load_adapterhub, save_adapterhub
from .accelerate import accelerate
from .pretrained import from_pretrained
from .extend import add_adapters
from .analysis import fusion_weights, plot_fusion_weights, record_fusion_weights
from .control import (
    FusionControl, clear_fusion_control, drop_adapters, force_adapter, force_fusion_weights, fusion_control,
    select_adapters, zero_adapters,
)
from .routing import add_fusion, fusion_names, prune_fusion, route, set_active_fusion
from .parallel import parallel

__all__ = [
    "__version__", "AdapterConfig", "FusionConfig", "FusedAdapterBlock", "KERNEL_ACTIVATIONS",
    # placing adapters and fusions in a model; AdapterHub and HF checkpoints
    "patch_model", "patch_bert", "add_adapters", "add_fusion", "set_active_fusion", "set_active_adapter",
    "fusion_names", "accelerate", "from_adapterhub", "load_adapterhub", "save_adapterhub", "from_pretrained",
    # running: backends, routing, training loss
    "set_backend", "available_backends", "resolve_backend", "route", "parallel", "fusion_regularization_loss", "fused_blocks",
    # analysis and inference-time control of the fusion weights
    "fusion_weights", "record_fusion_weights", "plot_fusion_weights", "FusionControl", "zero_adapters",
    "force_adapter", "force_fusion_weights", "clear_fusion_control", "fusion_control", "select_adapters",
    "drop_adapters", "prune_fusion",
]
