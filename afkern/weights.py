"""Reading weight files without executing pickled code: safetensors, or ``torch.load`` with
``weights_only=True`` (AdapterHub directories, ``save_pretrained`` checkpoints)."""

from __future__ import annotations

from typing import Dict, Mapping

import torch

__all__ = ["read_tensors"]


def read_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Load a weights file without executing pickled code."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid safetensors file: {exc}") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path} could not be loaded as a plain tensor file with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); afkern never unpickles arbitrary objects"
        ) from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return dict(sd)
