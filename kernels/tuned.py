"""Triton configs measured on a GPU, read by the fused core's autotuners (``fusion_core._tuned``).

``scripts/gpu_autotune.py`` (stage ``autotune`` of ``scripts/gpu_validate.sh``) times every
candidate config of the scores and mix kernels on a GPU and records the winners in
``kernels/tuned_configs.json`` (or the file that ``AFKERN_TUNED_CONFIGS`` names; ``off`` ignores
any file). The file maps one key per autotune key of a kernel,

    "<kernel>|sm<arch>|<dtype>|<name>=<value>,..."     e.g. "mix|sm90|bfloat16|D=768,R=48,NADP=16,APPLY_ACT=0"

(the names are the kernel's autotune key, booleans as 0/1), to ``{"config": {"BLOCK_T": ..,
"BLOCK_K": .., ..., "num_warps": .., "num_stages": ..}, ...}`` plus what was measured. When an
autotuner meets a key for the first time, :func:`prune_fn`'s function hands it the recorded config
alone (Triton then runs it without benchmarking) if the file has that key and the config is still
one of the kernel's candidates (``scores_configs`` / ``mix_configs``: a candidate list that changed
since the measurement falls back safely); otherwise every candidate, i.e. Triton's autotuning as
without the file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["ENV", "DEFAULT_PATH", "tuned_path", "load", "entry_key", "config_dict", "choose", "prune_fn"]

ENV = "AFKERN_TUNED_CONFIGS"
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_configs.json")
_CACHE: Dict[Tuple[str, float], Dict[str, Any]] = {}


def tuned_path() -> Optional[str]:
    """The tuned-config file in force (None: switched off with ``AFKERN_TUNED_CONFIGS=off``)."""
    p = os.environ.get(ENV, "").strip()
    if p.lower() in ("off", "0", "none", "false"):
        return None
    return p or DEFAULT_PATH


def load(path: Optional[str] = None) -> Dict[str, Any]:
    """The entries of the file (``{}`` if it is missing, off or unreadable: never an error)."""
    path = path if path is not None else tuned_path()
    if not path:
        return {}
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return {}
    hit = _CACHE.get((path, mtime))
    if hit is None:
        try:
            with open(path) as f:
                data = json.load(f)
            hit = data.get("entries", {}) if isinstance(data, dict) else {}
            if not isinstance(hit, dict):
                hit = {}
        except (OSError, ValueError):
            hit = {}
        _CACHE[(path, mtime)] = hit
    return hit


def _value(v) -> Any:
    return int(v) if isinstance(v, bool) else v


def entry_key(which: str, arch: int, dtype: str, key_values: Sequence[Tuple[str, Any]]) -> str:
    """The file's key of one autotune key of kernel ``which`` (module doc)."""
    dtype = str(dtype).replace("torch.", "")
    return f"{which}|sm{arch}|{dtype}|" + ",".join(f"{k}={_value(v)}" for k, v in key_values)


def config_dict(cfg) -> Dict[str, Any]:
    """A ``triton.Config`` as the file writes it: its meta-parameters, num_warps, num_stages."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def choose(which: str, configs: List[Any], arch: int, dtype: str, key_values: Sequence[Tuple[str, Any]],
           path: Optional[str] = None) -> List[Any]:
    """``[the recorded config]`` if the file has this key and the config is a candidate, else ``configs``."""
    entry = load(path).get(entry_key(which, arch, dtype, key_values))
    want = entry.get("config") if isinstance(entry, dict) else None
    if isinstance(want, dict):
        for cfg in configs:
            if config_dict(cfg) == want:
                return [cfg]
    return configs


def prune_fn(which: str, arch: int, key_names: Sequence[str], dtype_arg: str) -> Callable[..., List[Any]]:
    """An ``early_config_prune`` for ``triton.autotune``: the key's values come from the launch's
    arguments (``key_names``, as the autotuner's ``key``), the dtype from argument ``dtype_arg``."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        try:
            kv = [(k, args[k]) for k in key_names]
            dtype = args[dtype_arg].dtype
        except (KeyError, AttributeError):
            return configs
        return choose(which, configs, arch, str(dtype), kv)

    return prune
