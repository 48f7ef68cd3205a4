"""AdapterHub interop: convert ``adapters`` models, read and write AdapterHub directories.

Directory format (``adapters`` 1.x ``save_adapter`` / ``save_adapter_fusion``):

- adapter: ``adapter_config.json`` (``{"config": {...SeqBnConfig...}, "hidden_size", "name", ...}``)
  with ``adapter.safetensors`` or ``pytorch_adapter.bin``; keys like
  ``[<base_prefix>.]encoder.layer.<i>.output.adapters.<name>.adapter_down.0.weight``;
- fusion: ``adapter_fusion_config.json`` (``{"config": {...}, "adapter_names": [...], ...}``) with
  ``model_adapter_fusion.safetensors`` or ``pytorch_model_adapter_fusion.bin``; keys like
  ``[...]encoder.layer.<i>.output.adapter_fusion_layer.<a,b,...>.query.weight``.

``.bin`` files are read with ``torch.load(weights_only=True)``: a pickle that would run code is
refused. Loading validates everything before the model is touched; writes are atomic.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._io import atomic_write_bytes, atomic_write_json
from .backends import check_name
from .block import FusedAdapterBlock
from .config import AdapterConfig, FusionConfig
from .model import fused_blocks, install
from .patching import _model_dropout, encoder_layers, output_sites

__all__ = ["from_adapterhub", "load_adapterhub", "save_adapterhub"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
FUSION_CONFIG = "adapter_fusion_config.json"
FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
_LOC = {"output": "output", "attention": "attention.output"}
_SITE_RE = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.(attention\.output|output)\.(adapters|adapter_fusion_layer)\.")


# ---------------------------------------------------------------------------------- helpers
def _plain_class(module: nn.Module):
    """The transformers class under the classes ``adapters.init`` builds on top of it."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls
    raise TypeError(f"{type(module).__name__} is not built on a transformers model class")


def _site_sig(spec_cfg: AdapterConfig) -> Tuple:
    return (spec_cfg.non_linearity, spec_cfg.original_ln_before, spec_cfg.original_ln_after,
            spec_cfg.residual_before_ln, spec_cfg.mh_adapter, spec_cfg.output_adapter)


def _common_config(configs: Mapping[str, AdapterConfig]) -> AdapterConfig:
    names = list(configs)
    first = configs[names[0]]
    for n in names[1:]:
        if _site_sig(configs[n]) != _site_sig(first) or configs[n].reduction_factor != first.reduction_factor:
            raise ValueError(
                f"adapters {names[0]!r} and {n!r} differ in activation, reduction factor, placement or LayerNorm "
                "settings; afkern fuses adapters that share them"
            )
    return first


def _atomic_save_tensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))
    else:
        import io

        buf = io.BytesIO()
        torch.save(tensors, buf)
        atomic_write_bytes(path, buf.getvalue())


def _read_tensors(path: str) -> Dict[str, torch.Tensor]:
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


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found; expected an AdapterHub directory") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _weights_file(directory: str, names: Sequence[str]) -> str:
    for n in names:
        p = os.path.join(directory, n)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{directory} has none of {list(names)}")


def _hidden_size(model) -> int:
    cfg = getattr(model, "config", None)
    hs = getattr(cfg, "hidden_size", None)
    if hs is None:
        raise TypeError(f"{type(model).__name__} has no config.hidden_size")
    return int(hs)


def _parse_site_keys(sd: Mapping[str, torch.Tensor], kind: str, owner: str) -> Dict[Tuple[int, str], Dict[str, torch.Tensor]]:
    """{(layer, location): {param-suffix: tensor}} for keys ``...<kind>.<owner>.<suffix>``."""
    out: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    marker = f".{kind}.{owner}."
    for k, v in sd.items():
        m = _SITE_RE.search(k)
        i = k.find(marker)
        if m is None or i < 0 or m.group(3) != kind:
            raise ValueError(f"unexpected weight key {k!r}; expected '...encoder.layer.<i>.(output|attention.output).{kind}.{owner}.<param>'")
        loc = "attention" if m.group(2) == "attention.output" else "output"
        out.setdefault((int(m.group(1)), loc), {})[k[i + len(marker):]] = v
    return out


# ---------------------------------------------------------------------------------- build
def _fill_block(block: FusedAdapterBlock, adapters: Dict[str, Dict[str, torch.Tensor]],
                fusion: Optional[Dict[str, torch.Tensor]], where: str) -> None:
    need = ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias")
    for n, name in enumerate(block.adapter_names):
        w = adapters[name]
        missing = [k for k in need if k not in w]
        if missing:
            raise ValueError(f"adapter {name!r} at {where} lacks weights {missing}")
        block.set_adapter_weights(n, *(w[k].to(block.down_weight.dtype) for k in need))
    if fusion is not None:
        with torch.no_grad():
            for lin_name in ("query", "key", "value"):
                lin = getattr(block, lin_name, None)
                if lin is None:
                    continue
                for pname, p in lin.named_parameters():
                    key = f"{lin_name}.{pname}"
                    if key not in fusion:
                        raise ValueError(f"fusion weights at {where} lack {key!r}")
                    if tuple(fusion[key].shape) != tuple(p.shape):
                        raise ValueError(f"fusion {key} at {where} must be {tuple(p.shape)}, got {tuple(fusion[key].shape)}")
                    p.copy_(fusion[key])


def from_adapterhub(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Convert a model prepared with ``adapters`` (active ``Fuse(...)``) into a plain transformers
    model whose output modules are :class:`FusedAdapterBlock`s with the same weights.

    For an ``adapters`` ``*AdapterModel`` (with prediction heads) the converted base model is
    returned (heads are AdapterHub objects; move them yourself). The input model is not modified.
    """
    check_name(backend)
    try:
        from adapters.composition import Fuse, Stack
    except ImportError as exc:  # pragma: no cover
        raise ImportError("from_adapterhub needs the `adapters` package; use load_adapterhub for saved directories") from exc
    if not hasattr(model, "adapters_config"):
        raise TypeError(f"{type(model).__name__} was not prepared with the adapters package (adapters.init)")
    setup = model.active_adapters
    if isinstance(setup, Stack) and len(setup.children) == 1:
        setup = setup.children[0]
    if not isinstance(setup, Fuse):
        raise ValueError(f"the model's active adapter setup must be a Fuse(...), got {setup!r}; call set_active_adapters(Fuse(...))")
    names = list(setup.children)
    if any(not isinstance(n, str) for n in names):
        raise ValueError(f"only a Fuse of single adapters is supported, got {setup!r}")
    fusion_name = setup.name
    missing = [n for n in names if model.adapters_config.get(n) is None]
    if missing:
        raise ValueError(f"the Fuse names adapters the model lacks: {missing}")
    fcfg_obj, _ = model.adapters_config.get_fusion(fusion_name)
    if fcfg_obj is None:
        raise ValueError(f"the model has no fusion layer {fusion_name!r}; call add_adapter_fusion first")
    configs = {n: AdapterConfig.from_dict(model.adapters_config.get(n).to_dict()) for n in names}
    acfg = _common_config(configs)
    fcfg = FusionConfig.from_dict(fcfg_obj.to_dict())

    base = model.base_model
    cls = _plain_class(base)
    config = cls.config_class.from_dict(base.config.to_dict())
    for attr in ("adapters", "adapter_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    impl = getattr(base.config, "_attn_implementation", None)
    if impl is not None:  # keep the attention kernel (eager / sdpa) the adapters model runs
        config._attn_implementation = impl
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        # RoBERTa-style heads build their base model without the pooler: mirror what the model has
        kwargs["add_pooling_layer"] = getattr(base, "pooler", None) is not None
    plain = cls(config, **kwargs)
    p0 = next(base.parameters())
    plain.to(device=p0.device, dtype=p0.dtype)
    skip = (".adapters.", ".adapter_fusion_layer.", "invertible_adapters", "prefix_tuning", "prompt_tuning", "shared_parameters")
    sd = {k: v for k, v in base.state_dict().items() if not any(s in k for s in skip)}
    plain.load_state_dict(sd, strict=True)
    plain.train(model.training)

    builds = []
    for i, (old_layer, new_layer) in enumerate(zip(encoder_layers(base), encoder_layers(plain))):
        old_sites, new_sites = output_sites(old_layer), output_sites(new_layer)
        for loc, (old_parent, attr) in old_sites.items():
            old = getattr(old_parent, attr)
            present = [n for n in names if n in getattr(old, "adapters", {})]
            if not present:
                continue
            if len(present) != len(names) or fusion_name not in old.adapter_fusion_layer:
                raise ValueError(f"layer {i} {loc}: the Fuse needs adapters {names} and fusion {fusion_name!r}; found {present}")
            fl = old.adapter_fusion_layer[fusion_name]
            new_parent, new_attr = new_sites[loc]
            block = FusedAdapterBlock.from_output_module(
                getattr(new_parent, new_attr), names, adapter_config=acfg, fusion_config=fcfg,
                attention_probs_dropout_prob=fl.dropout.p, backend=backend, layer_idx=i,
            )
            if block.bottleneck != old.adapters[names[0]].down_sample:
                raise ValueError(f"layer {i} {loc}: bottleneck {old.adapters[names[0]].down_sample} != expected {block.bottleneck}")
            adapters_w = {}
            for n in names:
                a = old.adapters[n]
                if not isinstance(a.scaling, float):
                    raise ValueError(f"adapter {n!r} has a learned scaling; only float scaling is supported")
                adapters_w[n] = {k: v for k, v in a.state_dict().items()}
            _fill_block(block, adapters_w, fl.state_dict(), f"layer {i} {loc}")
            block.temperature = float(fl.T)
            block.train(model.training)
            builds.append((new_parent, new_attr, block))
    if not builds:
        raise ValueError(f"no layer carries the fusion {fusion_name!r}")
    install(builds)
    return plain


def _resolve_dirs(adapter_dirs) -> List[str]:
    if isinstance(adapter_dirs, (str, os.PathLike)):
        return [os.fspath(adapter_dirs)]
    if isinstance(adapter_dirs, Mapping):
        return [os.fspath(v) for v in adapter_dirs.values()]
    return [os.fspath(d) for d in adapter_dirs]


def load_adapterhub(model: nn.Module, adapter_dirs, fusion_dir: Optional[str] = None, backend: str = "auto") -> nn.Module:
    """Build fused blocks in a plain transformers BERT-family ``model`` from AdapterHub directories.

    Args:
        model: an unpatched transformers model (BertModel, BertForSequenceClassification, ...).
        adapter_dirs: directories written by ``save_adapter`` (a list, or {name: dir}).
        fusion_dir: a directory written by ``save_adapter_fusion``; its ``adapter_names`` order is the
            fusion order. Without it the adapters are added without fusion (first one active).
    The model is modified only after every file was read and checked. Returns the model.
    """
    check_name(backend)
    dirs = _resolve_dirs(adapter_dirs)
    if not dirs:
        raise ValueError("load_adapterhub needs at least one adapter directory")
    if any(isinstance(m, FusedAdapterBlock) for m in model.modules()):
        raise ValueError("model already has FusedAdapterBlocks; load into a fresh model")
    d_model = _hidden_size(model)
    layers = encoder_layers(model)
    configs: Dict[str, AdapterConfig] = {}
    weights: Dict[str, Dict[Tuple[int, str], Dict[str, torch.Tensor]]] = {}
    for d in dirs:
        meta = _read_json(os.path.join(d, ADAPTER_CONFIG))
        name = meta.get("name")
        if not name or "config" not in meta:
            raise ValueError(f"{d}/{ADAPTER_CONFIG} lacks 'name' or 'config'; not an AdapterHub adapter directory")
        if name in configs:
            raise ValueError(f"duplicate adapter name {name!r} in {dirs}")
        if int(meta.get("hidden_size", d_model)) != d_model:
            raise ValueError(f"adapter {name!r} in {d} was trained for hidden size {meta['hidden_size']}, the model has {d_model}")
        configs[name] = AdapterConfig.from_dict(meta["config"])
        weights[name] = _parse_site_keys(_read_tensors(_weights_file(d, ADAPTER_WEIGHTS)), "adapters", name)
        bad = [i for (i, _) in weights[name] if i >= len(layers)]
        if bad:
            raise ValueError(f"adapter {name!r} has weights for layer {max(bad)} but the model has {len(layers)} layers")
    fcfg, fusion_w, names = False, {}, list(configs)
    if fusion_dir is not None:
        meta = _read_json(os.path.join(fusion_dir, FUSION_CONFIG))
        names = list(meta.get("adapter_names") or [])
        if not names:
            raise ValueError(f"{fusion_dir}/{FUSION_CONFIG} lacks 'adapter_names'")
        missing = [n for n in names if n not in configs]
        if missing:
            raise ValueError(f"the fusion in {fusion_dir} names adapters {missing} that were not given (given: {list(configs)})")
        if int(meta.get("hidden_size", d_model)) != d_model:
            raise ValueError(f"fusion in {fusion_dir} has hidden size {meta['hidden_size']}, the model has {d_model}")
        fcfg = FusionConfig.from_dict(meta.get("config", {}))
        fusion_w = _parse_site_keys(_read_tensors(_weights_file(fusion_dir, FUSION_WEIGHTS)), "adapter_fusion_layer", ",".join(names))
        bad = [i for (i, _) in fusion_w if i >= len(layers)]
        if bad:
            raise ValueError(f"fusion has weights for layer {max(bad)} but the model has {len(layers)} layers")
    acfg = _common_config({n: configs[n] for n in names})
    p_drop = _model_dropout(model)
    builds = []
    for i, layer in enumerate(layers):
        for loc, (parent, attr) in output_sites(layer).items():
            have = [n for n in names if (i, loc) in weights[n]]
            placed = [n for n in names if i not in configs[n].leave_out
                      and (configs[n].mh_adapter if loc == "attention" else configs[n].output_adapter)]
            lacking = [n for n in placed if n not in have]
            if lacking:
                raise ValueError(
                    f"adapters {lacking} have no weights for layer {i} {loc}, where their config places an adapter "
                    f"(saved from a model with fewer layers? the model has {len(layers)})"
                )
            if not have:
                continue
            if len(have) != len(names):
                raise ValueError(f"layer {i} {loc}: adapters {sorted(set(names) - set(have))} have no weights there")
            if fcfg is not False and (i, loc) not in fusion_w:
                raise ValueError(f"layer {i} {loc}: the fusion has no weights there")
            block = FusedAdapterBlock.from_output_module(
                getattr(parent, attr), names, adapter_config=acfg, fusion_config=fcfg,
                attention_probs_dropout_prob=p_drop, backend=backend, layer_idx=i,
            )
            _fill_block(block, {n: weights[n][(i, loc)] for n in names}, fusion_w.get((i, loc)) if fcfg is not False else None,
                        f"layer {i} {loc}")
            block.train(model.training)
            builds.append((parent, attr, block))
    if not builds:
        raise ValueError("no adapter weights matched the model's layers")
    install(builds)
    return model


def _write_weights(directory: str, names: Sequence[str], tensors: Dict[str, torch.Tensor], safe_serialization) -> None:
    """Write safetensors (index 0 of ``names``), .bin (index 1) or both (``safe_serialization`` None),
    and remove a stale file of a format not written, so no loader can read an old copy."""
    chosen = {True: [0], False: [1], None: [0, 1]}[safe_serialization]
    for i in chosen:
        _atomic_save_tensors(os.path.join(directory, names[i]), tensors)
    for i in {0, 1} - set(chosen):
        stale = os.path.join(directory, names[i])
        if os.path.exists(stale):
            os.unlink(stale)


def save_adapterhub(model: nn.Module, out_dir: str, safe_serialization: Optional[bool] = None) -> Dict[str, str]:
    """Write every adapter (and the fusion) of ``model``'s fused blocks as AdapterHub directories.

    Layout: ``out_dir/<adapter>/`` for each adapter and ``out_dir/<a,b,...>/`` for the fusion,
    loadable by AdapterHub's ``load_adapter`` / ``load_adapter_fusion`` and by
    :func:`load_adapterhub`. ``safe_serialization``: True writes safetensors only (AdapterHub then
    needs ``use_safetensors=True``), False ``.bin`` only, None (default) both, so AdapterHub's
    default ``load_adapter(dir)`` reads it too. Returns {name: directory}. Each file is written
    atomically.
    """
    blocks = list(fused_blocks(model))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no FusedAdapterBlock to save")
    base = getattr(model, "base_model", model)
    prefix = "" if base is model else f"{model.base_model_prefix}."
    base_names = {id(m): n for n, m in base.named_modules()}
    names = blocks[0][1].adapter_names
    acfg, fcfg = blocks[0][1].adapter_config, blocks[0][1].fusion_config
    hidden = blocks[0][1].hidden_size
    per_adapter: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in names}
    fusion: Dict[str, torch.Tensor] = {}
    fusion_name = ",".join(names)
    for _, b in blocks:
        if b.adapter_names != names:
            raise ValueError("blocks carry different adapter sets; save_adapterhub expects one fusion setup")
        site = prefix + base_names[id(b)]
        for n, name in enumerate(names):
            for k, v in b.adapter_state(n).items():
                per_adapter[name][f"{site}.adapters.{name}.{k}"] = v
        if fcfg is not None:
            for lin_name in ("query", "key", "value"):
                lin = getattr(b, lin_name, None)
                if lin is not None:
                    for pname, p in lin.named_parameters():
                        fusion[f"{site}.adapter_fusion_layer.{fusion_name}.{lin_name}.{pname}"] = p
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    common = {"hidden_size": hidden, "model_class": type(model).__name__, "model_name": "", "model_type": model_type,
              "version": "adapters.1.3.0"}
    written = {}
    for name in names:
        d = os.path.join(out_dir, name)
        _write_weights(d, ADAPTER_WEIGHTS, per_adapter[name], safe_serialization)
        atomic_write_json(os.path.join(d, ADAPTER_CONFIG), dict(common, name=name, config=acfg.to_adapterhub_dict()))
        written[name] = d
    if fcfg is not None:
        d = os.path.join(out_dir, fusion_name)
        _write_weights(d, FUSION_WEIGHTS, fusion, safe_serialization)
        atomic_write_json(os.path.join(d, FUSION_CONFIG), dict(common, name=fusion_name, adapter_names=names, config=fcfg.to_dict()))
        written[fusion_name] = d
    return written
