"""The ``config.afkern`` record of a patched model (``afkern.pretrained`` reads it back) and the
model-level state every patched model carries (the temperature clock): :func:`track_model`, which
afkern's patch and load functions call. Its own module so that patching, AdapterHub loading and
``from_pretrained`` all import it without importing each other (docs/DESIGN.md section 8).
"""

from __future__ import annotations

import copy
import weakref

import torch.nn as nn

from ._version import __version__
from .config import AdapterConfig
from .fusion import attach_temperature_clock
from .model import fused_blocks, structure_kwargs

__all__ = ["FORMAT", "CONFIG_KEY", "describe_setup", "track_model", "LiveSetup", "base_prefix"]

#: The version of the ``config.afkern`` record written by this afkern.
FORMAT = 1
CONFIG_KEY = "afkern"


def base_prefix(model: nn.Module) -> str:
    """``"bert."`` for a head model whose base model is ``model.bert``, "" for a base model."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, m in model.named_children():
        if m is base:
            return name + "."
    return ""


def _placement(cfg: AdapterConfig) -> dict:
    d = cfg.to_dict()
    for k in ("init_weights", "init_weights_seed"):  # how new adapters start: not the computation
        d.pop(k)
    return d


def describe_setup(model: nn.Module) -> dict:
    """The afkern setup of a patched model, as recorded in ``config.afkern`` (JSON-serialisable;
    see the module docstring). Block names are relative to the base model (``encoder.layer.0.output``
    for a BERT with or without a head), so a record is readable by the base class and its heads."""
    blocks = list(fused_blocks(model))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no FusedAdapterBlock; nothing to record")
    prefix = base_prefix(model)
    first = blocks[0][1]
    acfg = first.adapter_config
    out = {"format": FORMAT, "afkern_version": _version(), "adapter_config": acfg.to_dict(),
           "backend": first.backend, "blocks": {}}
    base = getattr(model, "base_model", model)
    if hasattr(base, "pooler"):  # built without it (add_pooling_layer=False): rebuild it so
        out["pooler"] = base.pooler is not None
    for qual, b in blocks:
        if _placement(b.adapter_config) != _placement(acfg):
            raise ValueError(f"{qual} has another adapter placement or width than {blocks[0][0]}; a patched "
                             "model holds one adapter configuration")
        name = qual[len(prefix):] if prefix and qual.startswith(prefix) else qual
        entry = {
            "adapters": list(b.adapter_names),
            "fusions": [{"name": k, "adapters": list(f.adapter_names), "config": f.config.to_dict(),
                         "score_dropout": f.score_dropout, "temperature": f.temperature}
                        for k, f in b.fusions.items()],
            "active": {"fusion": b.active_fusion} if b.active_fusion is not None else {"adapter": b.active_adapter},
        }
        if b.backend != out["backend"]:
            entry["backend"] = b.backend
        out["blocks"][name] = entry
    return out


def _version() -> str:
    return __version__


class LiveSetup(dict):
    """``config.afkern`` of a patched model. As a dict it holds the setup recorded when it was
    attached; every copy of it (``PretrainedConfig.to_dict`` deep-copies the config, which
    ``save_pretrained`` and ``Trainer.save_model`` call) and every pickle is the model's setup at
    that moment (:func:`describe_setup`). It keeps a weak reference to the model; a deep copy of
    the whole model gets one that follows the copy."""

    def __init__(self, model: nn.Module):
        super().__init__(describe_setup(model))
        self._model = weakref.ref(model)

    def current(self) -> dict:
        model = self._model()
        if model is None or next(fused_blocks(model), None) is None:
            return dict(self)  # the model is gone, or its blocks were removed: the last record
        return describe_setup(model)

    def __deepcopy__(self, memo):
        model = self._model()
        twin = memo.get(id(model)) if model is not None else None
        if twin is not None:  # copy.deepcopy(model): the copy's config follows the copied model
            new = LiveSetup.__new__(LiveSetup)
            dict.update(new, copy.deepcopy(dict(self), memo))
            new._model = weakref.ref(twin)
            return new
        return copy.deepcopy(self.current(), memo)

    def __reduce__(self):
        return (dict, (self.current(),))


def track_model(model: nn.Module) -> nn.Module:
    """Everything a patched model carries at model level: the temperature clock (the fusion
    temperature moves with the model's forwards, never with a recomputation;
    :func:`afkern.fusion.attach_temperature_clock`) and
    the live ``config.afkern`` record. afkern's patch and load functions call it; idempotent."""
    attach_temperature_clock(model)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict") and next(fused_blocks(model), None) is not None:
        setattr(cfg, CONFIG_KEY, LiveSetup(model))
    return model
