"""AdapterHub interop: convert ``adapters`` models, read and write AdapterHub directories.

Directory format (``adapters`` 1.x ``save_adapter`` / ``save_adapter_fusion``):

- adapter: ``adapter_config.json`` (``{"config": {...SeqBnConfig...}, "hidden_size", "name", ...}``)
  with ``adapter.safetensors`` or ``pytorch_adapter.bin``; keys like
  ``[<base_prefix>.]encoder.layer.<i>.output.adapters.<name>.adapter_down.0.weight``;
- fusion: ``adapter_fusion_config.json`` (``{"config": {...}, "adapter_names": [...], ...}``) with
  ``model_adapter_fusion.safetensors`` or ``pytorch_model_adapter_fusion.bin``; keys like
  ``[...]encoder.layer.<i>.output.adapter_fusion_layer.<a,b,...>.query.weight``.

The site part of a key (``encoder.layer.<i>.output`` for BERT, ``h.<i>.output_adapters`` for
GPT-2, ``decoder.block.<i>.layer.1`` for T5's cross-attention, ...) is AdapterHub's module name on
transformers 4, for every family and also on transformers 5; the site table
(``afkern.families``) maps it to the model's layers both ways.

``.bin`` files are read with ``torch.load(weights_only=True)``: a pickle that would run code is
refused. Loading validates everything before the model is touched; writes are atomic.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._io import atomic_write_bytes, atomic_write_json, read_json
from .backends import check_name
from .block import FusedAdapterBlock
from .config import AdapterConfig, FusionConfig
from .adapterhub_base import drop_added_base_params, fold_adapterhub_bias
from .families import FAMILIES, family_of
from .record import track_model
from .model import fused_blocks, install, structure_kwargs
from .patching import build_site_block, model_dropout, site_placed
from .sites import Family, install_sites, site_blocks, slots_of
from .weights import read_tensors as _read_tensors

__all__ = ["from_adapterhub", "load_adapterhub", "save_adapterhub"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
FUSION_CONFIG = "adapter_fusion_config.json"
FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
# AdapterHub's loader renames these legacy module names (adapter-transformers 2.x/3.x) to "adapters"
_LEGACY = {".attention_text_task_adapters.": ".adapters.", ".attention_text_lang_adapters.": ".adapters.",
           ".layer_text_task_adapters.": ".adapters.", ".layer_text_lang_adapters.": ".adapters."}


# ---------------------------------------------------------------------------------- helpers
def _plain_class(module: nn.Module):
    """The transformers class under the classes ``adapters.init`` builds on top of it."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls
    raise TypeError(f"{type(module).__name__} is not built on a transformers model class")


def _converted_class(model: nn.Module):
    """(transformers class to build, the module whose weights it takes) for ``from_adapterhub``:
    the model's own transformers class with its head (BertForSequenceClassification,
    GPT2LMHeadModel, T5ForConditionalGeneration, ...), or the base class for a bare base model and
    for AdapterHub's ``*AdapterModel`` (its flexible heads have no transformers class: warned)."""
    base = model.base_model
    if type(model).__module__.startswith("adapters."):  # AutoAdapterModel & co: flexible heads
        heads = list(getattr(model, "heads", {}) or {})
        if heads:
            warnings.warn(f"from_adapterhub: {type(model).__name__}'s flexible heads {heads} are AdapterHub modules "
                          "with no transformers class; the converted model is the base model without them (keep "
                          "them from the AdapterHub model: model.heads[name])", UserWarning, stacklevel=3)
        return _plain_class(base), base
    if model is base:
        return _plain_class(base), base
    return _plain_class(model), model


def _site_sig(spec_cfg: AdapterConfig) -> Tuple:
    return (spec_cfg.non_linearity, spec_cfg.original_ln_before, spec_cfg.original_ln_after,
            spec_cfg.residual_before_ln, spec_cfg.mh_adapter, spec_cfg.output_adapter, spec_cfg.cross_adapter)


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


def _read_json(path: str) -> dict:
    return read_json(path, "an AdapterHub directory")


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


def _site_pattern(path: str) -> str:
    """A key prefix with its layer indices as ``<i>`` ("h.<i>.output_adapters")."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "<i>", path)


def _family_patterns(family: Family) -> List[str]:
    """AdapterHub's site key prefixes of a family, layer indices as ``<i>``."""
    out = []
    for stacks in (family.stacks, family.stacks_v5 or ()):
        for st in stacks:
            lay = (st.ah_layers or st.layers).replace("*", "0")
            out += [_site_pattern(f"{lay}.{site.ah}") for site in st.sites]
    return list(dict.fromkeys(out))


def _layer_index(site: str, family: Family) -> Optional[int]:
    """The layer number in an AdapterHub site prefix of ``family`` (its layer list's last index)."""
    for stacks in (family.stacks, family.stacks_v5 or ()):
        for st in stacks:
            pat = re.escape(st.ah_layers or st.layers).replace(r"\*", r"(\d+)")
            m = re.match(pat + r"\.", site + ".")
            if m:
                return int(m.groups()[-1])
    return None


def _unknown_sites(bad: List[Tuple[str, str]], what: str, model: nn.Module, family: Family) -> ValueError:
    """Why keys fit no site of ``model`` (``bad``: (key, site) pairs): layers or sites the model
    lacks (weights saved from a bigger model), or another family's directory."""
    mine = _family_patterns(family)
    ours = [(k, site) for k, site in bad if any(_site_pattern(site) == m or _site_pattern(site).endswith("." + m)
                                                for m in mine)]
    if ours:
        n_layers = len({s.path for s in slots_of(model, family)})
        idx = [i for i in (_layer_index(site, family) for _, site in ours) if i is not None]
        key, site = ours[0]
        return ValueError(
            f"{what} has weights for layer {max(idx) if idx else '?'} but the model has {n_layers} layers: "
            f"{key!r} is for site {site!r}, which this {type(model).__name__} lacks (saved from a model with more "
            "layers, or with a decoder / cross-attention this model does not have?)")
    key, site = bad[0]
    pat = _site_pattern(site)
    others = [f.name for f in FAMILIES.values() if f is not family and
              any(pat == m or pat.endswith("." + m) for m in _family_patterns(f))]
    hint = f"; it looks like a directory saved from a {' / '.join(others)} model" if others else ""
    return ValueError(f"{what}: weight {key!r} fits no adapter site of this {family.name} model "
                      f"({type(model).__name__}){hint}. Expected keys under {mine} (<i> = layer)")


def _parse_site_keys(sd: Mapping[str, torch.Tensor], kind: str, owner: str, model: nn.Module,
                     family: Family) -> Dict[str, Dict[str, torch.Tensor]]:
    """{AdapterHub site prefix: {param-suffix: tensor}} for keys
    ``[<base_model_prefix>.]<site>.<kind>.<owner>.<suffix>``, every site checked against the
    model's site table (``afkern.families``); an unknown site is a ValueError saying why."""
    sites = {s.ah_prefix for s in slots_of(model, family)}
    bp = getattr(model, "base_model_prefix", "") or ""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    bad: List[Tuple[str, str]] = []
    marker = f".{kind}."
    for k, v in sd.items():
        key = k
        for old, new in _LEGACY.items():
            key = key.replace(old, new)
        i = key.find(marker)
        if i < 0 or not key[i + len(marker):].startswith(owner + "."):
            raise ValueError(f"unexpected weight key {k!r}; expected '<site>.{kind}.{owner}.<param>'")
        site, suffix = key[:i], key[i + len(marker) + len(owner) + 1:]
        if site not in sites and bp and site.startswith(bp + "."):
            site = site[len(bp) + 1:]
        if site not in sites:
            bad.append((k, site))
            continue
        if suffix in out.setdefault(site, {}):
            raise ValueError(f"weight {k!r} appears twice (with and without the base-model prefix?)")
        out[site][suffix] = v
    if bad:
        what = f"adapter {owner!r}" if kind == "adapters" else f"fusion {owner!r}"
        raise _unknown_sites(bad, what, model, family)
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
        _fill_fusion(block.fusion, fusion, where)


def _fill_fusion(module, fusion: Dict[str, torch.Tensor], where: str) -> None:
    """Copy one fusion's query / key / value weights (keys ``query.weight`` ...) into ``module``
    (an ``afkern.fusion.AdapterFusion``)."""
    with torch.no_grad():
        for lin_name in ("query", "key", "value"):
            lin = getattr(module, lin_name, None)
            if lin is None:
                continue
            for pname, p in lin.named_parameters():
                key = f"{lin_name}.{pname}"
                if key not in fusion:
                    raise ValueError(f"fusion weights at {where} lack {key!r}")
                if tuple(fusion[key].shape) != tuple(p.shape):
                    raise ValueError(f"fusion {key} at {where} must be {tuple(p.shape)}, got {tuple(fusion[key].shape)}")
                p.copy_(fusion[key].to(p.dtype))


def from_adapterhub(model: nn.Module, backend: str = "auto", keep_adapterhub_bias: bool = False) -> nn.Module:
    """Convert a model prepared with ``adapters`` (active ``Fuse(...)`` of single adapters, or one
    active adapter) into a plain transformers model whose output modules are
    :class:`FusedAdapterBlock`s with the same weights. ``Stack`` / ``Parallel`` setups are refused.

    A model with a transformers head (``BertForSequenceClassification``, ``GPT2LMHeadModel``, ...)
    comes back as that class with its head's weights; an ``adapters`` ``*AdapterModel`` comes back
    as its base model (its flexible heads are AdapterHub modules with no transformers class: a
    warning names them). The input model is not modified.

    ``keep_adapterhub_bias``: ``adapters.init`` gives DeBERTa v1's bias-free ``in_proj`` a randomly
    drawn bias, so AdapterHub's DeBERTa computes another function than the transformers model;
    such a model is refused unless this is True, which reproduces AdapterHub's function exactly
    (``afkern.adapterhub_base.fold_adapterhub_bias``).
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
        setup = setup.children[0]  # set_active_adapters("a") or Fuse(...) reads back as a one-element Stack
    if setup is None:
        raise ValueError("the model has no active adapter setup; call set_active_adapters(name or Fuse(...))")
    if not isinstance(setup, (str, Fuse)) or (isinstance(setup, Fuse) and any(not isinstance(n, str) for n in setup.children)):
        kind = type(setup).__name__
        raise ValueError(
            f"the model's active setup is {setup!r}: afkern converts one adapter or one Fuse(...) of single adapters "
            f"per site; {kind}(...) compositions (Stack, Parallel, Split, BatchSplit, or nested in a Fuse) are not "
            "supported. Call set_active_adapters(name) or set_active_adapters(Fuse(a, b, ...)) first"
        )
    names = [setup] if isinstance(setup, str) else list(setup.children)
    fusion_name = setup.name if isinstance(setup, Fuse) else None  # None: one adapter, no fusion
    missing = [n for n in names if model.adapters_config.get(n) is None]
    if missing:
        raise ValueError(f"the active setup names adapters the model lacks: {missing}")
    fcfg = False
    if fusion_name is not None:
        fcfg_obj, _ = model.adapters_config.get_fusion(fusion_name)
        if fcfg_obj is None:
            raise ValueError(f"the model has no fusion layer {fusion_name!r}; call add_adapter_fusion first")
        fcfg = FusionConfig.from_dict(fcfg_obj.to_dict())
    configs = {n: AdapterConfig.from_dict(model.adapters_config.get(n).to_dict()) for n in names}
    acfg = _common_config(configs)

    base = model.base_model
    cls, top = _converted_class(model)
    config = cls.config_class.from_dict(base.config.to_dict())
    for attr in ("adapters", "adapter_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    impl = getattr(base.config, "_attn_implementation", None)
    if impl is not None:  # keep the attention kernel (eager / sdpa) the adapters model runs
        config._attn_implementation = impl
    plain = cls(config, **structure_kwargs(cls, base))  # RoBERTa-style heads leave the pooler out
    p0 = next(base.parameters())
    plain.to(device=p0.device, dtype=p0.dtype)
    skip = (".adapters.", ".adapter_fusion_layer.", "invertible_adapters", "prefix_tuning", "prompt_tuning", "shared_parameters")
    ah_sd = top.state_dict()  # with a head: the head's weights too, base keys under base_model_prefix
    sd = {k: v for k, v in ah_sd.items() if not any(s in k for s in skip)}
    if keep_adapterhub_bias:
        fold_adapterhub_bias(sd, plain)
    drop_added_base_params(sd, plain)
    plain.load_state_dict(sd, strict=True)
    plain.train(model.training)
    if top is not base and getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    family = family_of(plain)

    weights = {n: _parse_site_keys({k: v for k, v in ah_sd.items() if f".adapters.{n}." in k}, "adapters", n,
                                   plain, family) for n in names}
    fusion_w = {} if fusion_name is None else _parse_site_keys(
        {k: v for k, v in ah_sd.items() if f".adapter_fusion_layer.{fusion_name}." in k},
        "adapter_fusion_layer", fusion_name, plain, family)
    builds = []
    for slot in slots_of(plain, family):
        present = [n for n in names if slot.ah_prefix in weights[n]]
        if not present:
            continue
        where = f"{slot.ah_prefix} ({slot.site.location})"
        if len(present) != len(names) or (fusion_name is not None and slot.ah_prefix not in fusion_w):
            raise ValueError(f"{where}: the Fuse needs adapters {names} and fusion {fusion_name!r}; found {present}")
        old = base.get_submodule(slot.ah_prefix)
        fl = old.adapter_fusion_layer[fusion_name] if fusion_name is not None else None
        p_drop = fl.dropout.p if fl is not None else model_dropout(plain, family)
        block = build_site_block(plain, slot, names, acfg, fcfg, p_drop, backend)
        if block.bottleneck != old.adapters[names[0]].down_sample:
            raise ValueError(f"{where}: bottleneck {old.adapters[names[0]].down_sample} != expected {block.bottleneck}")
        for n in names:
            if not isinstance(old.adapters[n].scaling, float):
                raise ValueError(f"adapter {n!r} has a learned scaling; only float scaling is supported")
        _fill_block(block, {n: weights[n][slot.ah_prefix] for n in names}, fusion_w.get(slot.ah_prefix), where)
        if fl is not None:
            block.temperature = float(fl.T)
            block.score_dropout = float(fl.dropout.p)  # the layer's own module, as AdapterHub's forward uses it
        block.train(model.training)
        builds.append((slot, block))
    if not builds:
        raise ValueError(f"no site of this {family.name} model carries the {f'fusion {fusion_name!r}' if fusion_name else f'adapter {names[0]!r}'}")
    install_sites(plain, builds, install)
    track_model(plain)  # the temperature clock and the config.afkern record (afkern.pretrained)
    return plain


def _resolve_dirs(adapter_dirs) -> List[str]:
    if isinstance(adapter_dirs, (str, os.PathLike)):
        return [os.fspath(adapter_dirs)]
    if isinstance(adapter_dirs, Mapping):
        return [os.fspath(v) for v in adapter_dirs.values()]
    return [os.fspath(d) for d in adapter_dirs]


def _fusion_dirs(fusion_dir) -> List[Tuple[Optional[str], str]]:
    """[(name or None, directory)] from one directory, a list of them, or {name: directory}."""
    if fusion_dir is None:
        return []
    if isinstance(fusion_dir, (str, os.PathLike)):
        return [(None, os.fspath(fusion_dir))]
    if isinstance(fusion_dir, Mapping):
        return [(str(k), os.fspath(v)) for k, v in fusion_dir.items()]
    return [(None, os.fspath(d)) for d in fusion_dir]


def _read_fusion(name: Optional[str], directory: str, configs, d_model: int, model, family) -> dict:
    """One fusion directory, read and checked: its name (given, else AdapterHub's: the config's
    ``name``, by default ``"a,b,c"``), adapters, config and weights per site."""
    meta = _read_json(os.path.join(directory, FUSION_CONFIG))
    names = list(meta.get("adapter_names") or [])
    if not names:
        raise ValueError(f"{directory}/{FUSION_CONFIG} lacks 'adapter_names'")
    missing = [n for n in names if n not in configs]
    if missing:
        raise ValueError(f"the fusion in {directory} names adapters {missing} that were not given (given: {list(configs)})")
    if int(meta.get("hidden_size", d_model)) != d_model:
        raise ValueError(f"fusion in {directory} has hidden size {meta['hidden_size']}, the model has {d_model}")
    saved_as = meta.get("name") or ",".join(names)  # the name in the weight keys
    weights = _parse_site_keys(_read_tensors(_weights_file(directory, FUSION_WEIGHTS)), "adapter_fusion_layer",
                               saved_as, model, family)
    return dict(name=name or saved_as, dir=directory, names=names,
                config=FusionConfig.from_dict(meta.get("config", {})), weights=weights)


def load_adapterhub(model: nn.Module, adapter_dirs, fusion_dir=None, backend: str = "auto") -> nn.Module:
    """Build fused blocks in a plain transformers ``model`` of any supported family from AdapterHub
    directories (keys mapped through the site table, ``afkern.families``; transformers 4 and 5).

    Args:
        model: an unpatched transformers model (BertModel, GPT2LMHeadModel, T5ForConditionalGeneration, ...).
        adapter_dirs: directories written by ``save_adapter`` (a list, or {name: dir}).
        fusion_dir: a directory written by ``save_adapter_fusion`` (its ``adapter_names`` order is the
            fusion order), a list of them, or {name: directory}: several fusions, each under
            AdapterHub's fusion name (``"a,b,c"``, or the name it was saved with) or the given
            one; the blocks then hold the union of their adapters and the first fusion is active
            (``afkern.set_active_fusion``, ``afkern.route``). Without it the adapters are added
            without fusion (first one active).
    The model is modified only after every file was read and checked. Returns the model.
    """
    check_name(backend)
    dirs = _resolve_dirs(adapter_dirs)
    if not dirs:
        raise ValueError("load_adapterhub needs at least one adapter directory")
    if any(isinstance(m, FusedAdapterBlock) for m in model.modules()):
        raise ValueError("model already has FusedAdapterBlocks; load into a fresh model")
    d_model = _hidden_size(model)
    family = family_of(model)
    configs: Dict[str, AdapterConfig] = {}
    weights: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
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
        weights[name] = _parse_site_keys(_read_tensors(_weights_file(d, ADAPTER_WEIGHTS)), "adapters", name,
                                         model, family)
    fusions = [_read_fusion(n, fd, configs, d_model, model, family) for n, fd in _fusion_dirs(fusion_dir)]
    seen: Dict[str, str] = {}
    for f in fusions:
        if f["name"] in seen:
            raise ValueError(f"two fusions named {f['name']!r} ({seen[f['name']]} and {f['dir']}); pass fusion_dir as "
                             "{name: directory} to load them under different names")
        seen[f["name"]] = f["dir"]
    names = list(configs)
    if fusions:  # the union of the fusions' adapters, in order of appearance
        names = []
        for f in fusions:
            names += [n for n in f["names"] if n not in names]
    # one fusion over exactly the blocks' adapters under its default name: built with the block
    single = len(fusions) == 1 and fusions[0]["name"] == ",".join(names)
    fcfg = fusions[0]["config"] if single else False
    acfg = _common_config({n: configs[n] for n in names})
    p_drop = model_dropout(model, family)
    builds = []
    for slot in slots_of(model, family):
        key, where = slot.ah_prefix, f"{slot.ah_prefix} ({slot.site.location})"
        have = [n for n in names if key in weights[n]]
        lacking = [n for n in names if site_placed(slot, configs[n]) and n not in have]
        if lacking:
            loc = {"mh_adapter": "attention", "cross_adapter": "cross-attention", "output_adapter": "output"}
            raise ValueError(
                f"adapters {lacking} have no weights for layer {slot.index} {loc[slot.site.location]} ({key}), where "
                f"their config places an adapter (saved from a model with fewer layers or sites than this "
                f"{type(model).__name__}?)"
            )
        if not have:
            continue
        if len(have) != len(names):
            raise ValueError(f"{where}: adapters {sorted(set(names) - set(have))} have no weights there")
        for f in fusions:
            if key not in f["weights"]:
                raise ValueError(f"{where}: the fusion {f['name']!r} ({f['dir']}) has no weights there")
        block = build_site_block(model, slot, names, acfg, fcfg, p_drop, backend)
        _fill_block(block, {n: weights[n][key] for n in names}, None, where)
        for f in fusions:
            module = block.fusions[f["name"]] if single else block.add_fusion(f["name"], f["names"], f["config"])
            _fill_fusion(module, f["weights"][key], f"{where}, fusion {f['name']!r}")
        if fusions and not single:
            block.set_active_fusion(fusions[0]["name"])
        builds.append((slot, block))
    if not builds:
        raise ValueError("no adapter weights matched the model's sites")
    install_sites(model, builds, install)
    track_model(model)  # the temperature clock and the config.afkern record (afkern.pretrained)
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


def save_adapterhub(model: nn.Module, out_dir: str, safe_serialization: Optional[bool] = None,
                    fusions=None) -> Dict[str, str]:
    """Write every adapter and every fusion of ``model``'s fused blocks as AdapterHub directories.

    Layout: ``out_dir/<adapter>/`` for each adapter and ``out_dir/<fusion name>/`` for each fusion
    (AdapterHub's default name is ``"a,b,c"``; a fusion named otherwise is saved under that name,
    as AdapterHub's ``add_adapter_fusion(..., name=...)`` does), loadable by AdapterHub's
    ``load_adapter`` / ``load_adapter_fusion`` and by :func:`load_adapterhub`.
    ``safe_serialization``: True writes safetensors only (AdapterHub then needs
    ``use_safetensors=True``), False ``.bin`` only, None (default) both, so AdapterHub's default
    ``load_adapter(dir)`` reads it too. ``fusions``: which fusions to write (default all): a list
    of names, or {name: name to save it under}. Returns {name: directory}. Each file is written
    atomically.
    """
    blocks = list(fused_blocks(model))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no FusedAdapterBlock to save")
    # Keys always carry the transformers base_model_prefix ("bert.encoder.layer.0..."): AdapterHub's
    # loaders strip it for a base model and need it for a head or *AdapterModel class, whose fusion
    # loader would otherwise skip every key without a word
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    ah_names = {id(b): slot.ah_prefix for slot, b in site_blocks(model, family_of(model))}  # AdapterHub's site names
    names = blocks[0][1].adapter_names
    acfg = blocks[0][1].adapter_config
    hidden = blocks[0][1].hidden_size
    have = list(blocks[0][1].fusions)
    if fusions is None:
        save_as = {k: k for k in have}
    else:
        save_as = {fusions: fusions} if isinstance(fusions, str) else (
            dict(fusions) if isinstance(fusions, Mapping) else {k: k for k in fusions})
        unknown = [k for k in save_as if k not in have]
        if unknown:
            raise ValueError(f"unknown fusions {unknown}; the model has {have}")
    per_adapter: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in names}
    fusion: Dict[str, Dict[str, torch.Tensor]] = {k: {} for k in save_as}
    placed = [q for q, b in blocks if id(b) not in ah_names]
    if placed:
        raise ValueError(f"fused blocks {placed[:3]} are not at a site of the {family_of(model).name} site table "
                         "(placed by hand?); AdapterHub has no key name for them")
    for _, b in blocks:
        if b.adapter_names != names or list(b.fusions) != have:
            raise ValueError("blocks carry different adapter or fusion sets; save_adapterhub expects one setup")
        site = prefix + ah_names[id(b)]
        for n, name in enumerate(names):
            for k, v in b.adapter_state(n).items():
                per_adapter[name][f"{site}.adapters.{name}.{k}"] = v
        for k, as_name in save_as.items():
            for lin_name in ("query", "key", "value"):
                lin = getattr(b.fusions[k], lin_name, None)
                if lin is not None:
                    for pname, p in lin.named_parameters():
                        fusion[k][f"{site}.adapter_fusion_layer.{as_name}.{lin_name}.{pname}"] = p
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    common = {"hidden_size": hidden, "model_class": type(model).__name__, "model_name": "", "model_type": model_type,
              "version": "adapters.1.3.0"}
    written = {}
    for name in names:
        d = os.path.join(out_dir, name)
        _write_weights(d, ADAPTER_WEIGHTS, per_adapter[name], safe_serialization)
        atomic_write_json(os.path.join(d, ADAPTER_CONFIG), dict(common, name=name, config=acfg.to_adapterhub_dict()))
        written[name] = d
    for k, as_name in save_as.items():
        f = blocks[0][1].fusions[k]
        d = os.path.join(out_dir, as_name)
        _write_weights(d, FUSION_WEIGHTS, fusion[k], safe_serialization)
        atomic_write_json(os.path.join(d, FUSION_CONFIG), dict(common, name=as_name, adapter_names=list(f.adapter_names),
                                                                config=f.config.to_dict()))
        written[as_name] = d
    return written
