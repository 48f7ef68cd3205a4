"""Loader for afkern's optional CUDA extension (``afkern._C``), built from csrc/.

The extension is optional at build and at import: importing afkern never fails because of it;
only asking for backend ``"cuda"`` reports why it is missing.
"""

from __future__ import annotations

from typing import Tuple

_EXT = None
_ERR = "not tried"


def _load():
    global _EXT, _ERR
    if _EXT is not None or _ERR != "not tried":
        return _EXT
    try:
        from . import _C  # type: ignore[attr-defined]

        _EXT = _C
        _ERR = ""
    except Exception as exc:
        _ERR = (
            f"the CUDA extension afkern._C is not built ({exc}); reinstall with a CUDA toolkit and a "
            "CUDA build of torch present (AFKERN_FORCE_CUDA_BUILD=1 pip install .)"
        )
    return _EXT


def extension_status() -> Tuple[bool, str]:
    ext = _load()
    return (ext is not None), ("ok" if ext is not None else _ERR)


def fusion_layer_cuda(*args, **kwargs):  # replaced when the extension lands (see csrc/)
    ok, why = extension_status()
    raise RuntimeError(f"backend 'cuda' cannot run: {why}")
