"""Whole-model save and reload of patched models: ``save_pretrained`` / ``Trainer.save_model``, then
:func:`from_pretrained`.

A transformers ``save_pretrained`` writes the model's ``config.json`` and its ``state_dict``. The
state dict of a patched model already holds every adapter and fusion weight, each fusion's
temperature and each block's active setup (module extra state). What a plain ``from_pretrained``
cannot know is the structure those keys belong to, so it drops them as "unexpected" and returns
the plain model. afkern therefore records its setup in the config, as ``config.afkern``:

    {"format": 1, "afkern_version": ..., "adapter_config": {...AdapterConfig...}, "backend": "auto",
     "blocks": {"<block name under the base model>": {
         "adapters": [...],                                   # this block's, after pruning / dropping
         "fusions": [{"name", "adapters", "config", "score_dropout", "temperature"}, ...],
         "active": {"fusion": name} | {"adapter": name},
         ["backend": name]}}}                                 # where a block's differs from the model's

``config.afkern`` is live: every serialisation of the config (``config.to_dict()``, which
``save_pretrained``, ``Trainer.save_model`` and ``push_to_hub`` all go through) records the setup
as it is at that moment, so pruning, ``drop_adapters``, ``add_adapters``, ``add_fusion``, a new
active setup or the annealed temperature need no extra call. :func:`from_pretrained` reads the
record, builds the model class the config names, places the blocks as recorded and loads the
weights: the same outputs as the saved model.

Loading never runs pickled code: ``config.json`` is JSON, weights are safetensors or ``.bin`` read
with ``torch.load(weights_only=True)``, and the model class is looked up by name in
``transformers`` (never ``trust_remote_code``). Everything is read and checked before the model is
built, and the model is returned only once it is complete.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ._io import read_json
from .backends import check_name
from .config import AdapterConfig, FusionConfig
from .model import fused_blocks, structure_kwargs
from .record import CONFIG_KEY, FORMAT, base_prefix, describe_setup, track_model
from .weights import read_tensors

__all__ = ["from_pretrained", "describe_setup", "track_model", "FORMAT"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------------- loading
def _read_json(path: str) -> dict:
    return read_json(path, "a directory written by save_pretrained")


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The saved state dict (single file or shards), safetensors preferred; never unpickles code."""
    present = [n for n in _WEIGHTS if os.path.exists(os.path.join(path, n))]
    if not present:
        raise FileNotFoundError(f"{path} has no weights ({', '.join(_WEIGHTS)}); expected a directory written "
                                "by save_pretrained")
    name = present[0]
    if not name.endswith(".index.json"):
        return read_tensors(os.path.join(path, name))
    index = _read_json(os.path.join(path, name))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path}/{name} has no 'weight_map'")
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if not isinstance(s, str) or os.path.basename(s) != s or s.startswith(".")]
    if bad:
        raise ValueError(f"{path}/{name} names shard files outside the directory: {bad[:3]}")
    sd: Dict[str, torch.Tensor] = {}
    for s in shards:
        sd.update(read_tensors(os.path.join(path, s)))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise ValueError(f"the shards of {path} lack {missing[:3]}{' ...' if len(missing) > 3 else ''} listed in {name}")
    return sd


def _model_class(raw: dict, model_class):
    if model_class is not None:
        if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
            raise TypeError(f"model_class must be a transformers model class, got {model_class!r}")
        return model_class
    import transformers

    archs = raw.get("architectures") or []
    if not archs:
        raise ValueError("the config names no architecture ('architectures'); pass model_class=")
    cls = getattr(transformers, archs[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"the config names architecture {archs[0]!r}, which is not a transformers model class; "
                         "pass model_class= (afkern never loads remote code)")
    return cls


def _check_record(rec, path: str) -> dict:
    if rec is None:
        raise ValueError(f"{path}/config.json has no 'afkern' entry: it was not saved from an afkern-patched model "
                         "(load it with transformers' from_pretrained, then afkern.patch_model or load_adapterhub)")
    if not isinstance(rec, dict) or not isinstance(rec.get("blocks"), dict) or not rec["blocks"]:
        raise ValueError(f"{path}/config.json: the 'afkern' entry is malformed (no blocks)")
    fmt = rec.get("format")
    if fmt != FORMAT:
        raise ValueError(f"{path}/config.json: afkern record format {fmt!r}; this afkern reads format {FORMAT} "
                         "(upgrade afkern)")
    for name, e in rec["blocks"].items():
        if not isinstance(e, dict) or not e.get("adapters") or "active" not in e:
            raise ValueError(f"{path}/config.json: afkern record of block {name!r} is malformed")
    return rec


def _union(rec: dict) -> List[str]:
    out: Dict[str, None] = {}
    for e in rec["blocks"].values():
        out.update(dict.fromkeys(e["adapters"]))
    return list(out)


def _rebuild(model: nn.Module, rec: dict, backend: Optional[str]) -> nn.Module:
    """Place the recorded blocks in a freshly built plain ``model``."""
    from .model import replace_blocks
    from .patching import patch_model

    acfg = AdapterConfig.from_dict(rec["adapter_config"])
    model_backend = rec.get("backend", "auto") if backend is None else backend
    patch_model(model, _union(rec), adapter_config=acfg, fusion_config=False, backend=check_name(model_backend))
    prefix = base_prefix(model)
    have = {(q[len(prefix):] if prefix and q.startswith(prefix) else q): (q, b) for q, b in fused_blocks(model)}
    if set(have) != set(rec["blocks"]):
        lost, extra = sorted(set(rec["blocks"]) - set(have)), sorted(set(have) - set(rec["blocks"]))
        raise ValueError(f"the recorded blocks do not match where this {type(model).__name__} places adapters "
                         f"(recorded only: {lost[:3]}; placed only: {extra[:3]})")
    new = {}
    for name, e in rec["blocks"].items():
        qual, b = have[name]
        if list(e["adapters"]) != b.adapter_names:
            b.set_active_adapter(e["adapters"][0])
            b = b.select_adapters(e["adapters"])
        for f in e.get("fusions", []):
            fusion = b.add_fusion(f["name"], f["adapters"], FusionConfig.from_dict(f["config"]),
                                  score_dropout=float(f["score_dropout"]))
            fusion.temperature = float(f.get("temperature", fusion.temperature))
        active = e["active"]
        if active.get("fusion") is not None:
            b.set_active_fusion(active["fusion"])
        else:
            b.set_active_adapter(active["adapter"])
        if backend is None and e.get("backend"):
            b.set_backend(check_name(e["backend"]))
        new[qual] = b
    replace_blocks(model, new)
    return model


def _load_weights(model: nn.Module, sd: Dict[str, torch.Tensor], saved_class: Optional[str], path: str) -> None:
    """Load ``sd`` strictly: every key must fit; keys missing are allowed only for weights tied to
    a loaded one, or for a head the saved model did not have (loading into another class)."""
    own = model.state_dict(keep_vars=True)
    prefix = base_prefix(model) or f"{getattr(model, 'base_model_prefix', '')}."
    if prefix != "." and not any(k.startswith(prefix) for k in sd) and any(k.startswith(prefix) for k in own):
        sd = {prefix + k: v for k, v in sd.items()}  # a base model's checkpoint into a head class
    elif prefix != "." and any(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in own):
        sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}  # a head's into its base
    unexpected = sorted(set(sd) - set(own))
    if unexpected and saved_class == type(model).__name__:
        raise ValueError(f"{path}: weights {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} fit no "
                         f"parameter of the rebuilt {type(model).__name__}; the config's afkern record and the "
                         "weights disagree")
    by_tensor: Dict[int, List[str]] = {}
    for k, t in own.items():
        if isinstance(t, torch.Tensor):
            by_tensor.setdefault(id(t), []).append(k)
    missing = [k for k in own if k not in sd and not (isinstance(own[k], torch.Tensor)
                                                      and any(o in sd for o in by_tensor[id(own[k])]))]
    if missing and saved_class == type(model).__name__:
        raise ValueError(f"{path}: the saved weights lack {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for k, v in sd.items():
        t = own.get(k)
        if isinstance(t, torch.Tensor) and not k.endswith("_extra_state") and tuple(t.shape) != tuple(v.shape):
            raise ValueError(f"{path}: weight {k} is {tuple(v.shape)} but the rebuilt model's is {tuple(t.shape)}")
    if missing or unexpected:
        warnings.warn(f"loading a {saved_class} checkpoint into {type(model).__name__}: newly initialised "
                      f"{missing[:4]}, not used {unexpected[:4]}", stacklevel=3)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def from_pretrained(path: str, model_class=None, backend: Optional[str] = "auto") -> nn.Module:
    """Load a patched model saved with ``save_pretrained`` (or HF ``Trainer.save_model``).

    Args:
        path: the directory (``config.json`` with its ``afkern`` record, and ``model.safetensors``,
            ``pytorch_model.bin`` or their sharded forms).
        model_class: the transformers class to build; default the one the config names
            (``architectures[0]``, looked up in ``transformers``).
        backend: the blocks' backend (``"auto"`` default); None restores the backends recorded at
            save time.
    Returns the model in eval mode (as transformers' ``from_pretrained``), on the CPU, in the dtype
    of the saved weights, with the saved adapters, fusions, active setups and temperatures: the
    same outputs as the model that was saved. Raises, building nothing, if a file is missing or
    does not fit the record.
    """
    path = os.fspath(path)
    if backend is not None:
        check_name(backend)
    raw = _read_json(os.path.join(path, "config.json"))
    rec = _check_record(raw.get(CONFIG_KEY), path)
    cls = _model_class(raw, model_class)
    sd = _read_state_dict(path)
    config = cls.config_class.from_dict({k: v for k, v in raw.items() if k != CONFIG_KEY})
    model = cls(config, **structure_kwargs(cls, has_pooler=rec.get("pooler")))
    floats = [v.dtype for k, v in sd.items() if v.is_floating_point() and not k.endswith("_extra_state")]
    if floats and floats[0] != torch.float32 and all(d == floats[0] for d in floats):
        model.to(floats[0])
    saved = (raw.get("architectures") or [None])[0]
    _rebuild(model, rec, backend)
    _load_weights(model, sd, saved, path)
    track_model(model)
    return model.eval()
