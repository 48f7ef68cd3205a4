"""All tasks of a stage in one run (issue 12; the paper, section 2.2.1: "This makes it possible to
efficiently parallelize the training of adapters for all tasks").

``afkern-train adapters --parallel`` trains every single-task adapter in one model and one loop;
``afkern-train fusion`` with several ``--task`` trains one fusion per target task (each over all
the adapters) the same way. Each step's batch concatenates one batch of every task still training;
``afkern.route`` sends each sequence through its own adapter (stage 1) or its own fusion (stage
2), and each task's head reads its own rows. The loss is the sum of the tasks' mean losses, so each
adapter or fusion gets exactly the gradient of its own task's loss.

Everything else is per task, as in the one-task-at-a-time runs of :mod:`.stages`: the initial
weights (drawn with the same seed in the same order), the epoch order of its batches, its AdamW
optimizer, learning-rate schedule (over its own number of steps), gradient clipping (over its own
parameters), dev evaluation at the end of each of its epochs, early stopping, and the best weights
it keeps. A stage-1 adapter is a row of the stacked adapter parameters: its optimizer updates a
proxy leaf whose gradient is that row's, and writes it back after each step. The outputs are the
files the sequential runs write (adapters/, heads/, metrics_adapters.json; fusion-<task>/,
metrics_fusion.json, the heatmap), plus a ``"parallel"`` record of the joint run.

Not supported with the joint run (refused before training): DDP, ``--resume``, ``--save-every``
and ``--stop-after-steps`` (the joint run keeps no checkpoint).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import (fused_blocks, fusion_regularization_loss, patch_bert, route, save_adapterhub)
from .batches import Encoded, encode_task, epoch_batches
from .data import TaskData
from .dist import Dist, log
from .errors import TrainError
from .heads import AdapterClassifier, ClassificationHead, save_head
from .loop import amp_context, dev_rule, evaluate
from .metrics import data_note, env_info, settings, task_record, write_adapter_metrics
from .models import build_fusion_model, check_model_dir, freeze, load_base_model, load_tokenizer, resolve_adapter_dirs

__all__ = ["train_adapters_parallel", "train_fusion_parallel", "TaskView", "check_parallel"]


def check_parallel(cfg, d: Dist) -> None:
    """TrainError (before any training) for what a joint run does not support."""
    bad = [f"--{k.replace('_', '-')}" for k in ("resume", "save_every", "stop_after_steps") if getattr(cfg, k, None)]
    if d.enabled:
        bad.append("DDP (torchrun)")
    if bad:
        raise TrainError(f"training several tasks in one run does not support {', '.join(bad)} (it keeps no "
                         "checkpoint); train the tasks one at a time for that")


class TaskView(AdapterClassifier):
    """One task's classifier inside the joint model: the shared encoder with every sequence routed
    to the task's adapter or fusion (``kind`` "adapter" or "fusion"), and the task's head."""

    def __init__(self, encoder: nn.Module, head: ClassificationHead, kind: str, name: str):
        super().__init__(encoder, head)
        self.kind, self.name = kind, name

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        with route(self.encoder, **{self.kind: [self.name] * input_ids.shape[0]}):
            return super().forward(input_ids, attention_mask, token_type_ids)


class _Row:
    """Row ``index`` of a stacked parameter, optimised through a proxy leaf."""

    def __init__(self, param: nn.Parameter, index: int):
        self.param, self.index = param, index
        self.proxy = param.detach()[index].clone().requires_grad_(True)

    def pull_grad(self) -> None:
        g = self.param.grad
        self.proxy.grad = None if g is None else g[self.index].clone()

    @torch.no_grad()
    def push(self) -> None:
        self.param[self.index].copy_(self.proxy)


class _Task:
    """One task's state in the joint loop."""

    def __init__(self, task: TaskData, train: Encoded, dev: Encoded, head: ClassificationHead, body: List[torch.Tensor],
                 rows: List[_Row], cfg, d: Dist):
        from transformers import get_linear_schedule_with_warmup

        self.task, self.train, self.dev, self.head, self.body, self.rows = task, train, dev, head, body, rows
        head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
        self.opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr},
                                      {"params": [p for p in head.parameters() if p.requires_grad], "lr": head_lr}],
                                     weight_decay=cfg.weight_decay)
        per_epoch = len(epoch_batches(len(train), cfg.batch_size, cfg.seed, 0, d))
        total = per_epoch * cfg.epochs
        self.sched = get_linear_schedule_with_warmup(self.opt, int(cfg.warmup_ratio * total), total)
        self.epoch, self.batches, self.pos, self.step = 0, None, 0, 0
        self.best_acc, self.best_epoch, self.bad, self.finished = -1.0, -1, 0, False
        self.history: List[dict] = []
        self.loss_sum, self.loss_count = 0.0, 0
        self.best_state: Optional[list] = None

    @property
    def name(self) -> str:
        return self.task.name

    def params(self) -> List[torch.Tensor]:
        return self.body + [p for p in self.head.parameters() if p.requires_grad]

    def snapshot(self) -> list:
        return [t.detach().clone() for t in self.body] + [copy.deepcopy(self.head.state_dict())]

    @torch.no_grad()
    def restore(self, state: list) -> None:
        for t, v in zip(self.body, state[:-1]):
            t.copy_(v)
        self.head.load_state_dict(state[-1])
        for r in self.rows:
            r.push()

    def optimizer_step(self, max_grad_norm: float) -> None:
        for r in self.rows:
            r.pull_grad()
        ps = [p for p in self.params() if p.grad is not None]
        if max_grad_norm > 0 and ps:
            torch.nn.utils.clip_grad_norm_(ps, max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        for r in self.rows:
            r.push()
        self.step += 1


def _concat(batches: List[dict], pad_id: int) -> dict:
    """One padded batch from several (each padded to its own longest)."""
    L = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for k in batches[0]:
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.cat([F.pad(b[k], (0, L - b[k].shape[1]), value=fill) for b in batches])
    return out


def _joint_loop(cfg, d: Dist, enc: nn.Module, states: List[_Task], kind: str, reg: bool) -> float:
    """Train every task until each stops (its epochs, or early stopping); returns the seconds spent
    in training steps (dev passes excluded). Leaves each task's best weights in place."""
    amp, _ = amp_context(cfg, d.device)
    from tqdm.auto import tqdm

    train_time = 0.0
    total_steps = sum(len(epoch_batches(len(s.train), cfg.batch_size, cfg.seed, 0, d)) * cfg.epochs for s in states)
    bar = tqdm(total=total_steps, desc=f"{kind}s x{len(states)} (joint)", disable=not d.main or cfg.no_progress,
               leave=False, dynamic_ncols=True)
    while not all(s.finished for s in states):
        active = [s for s in states if not s.finished]
        parts, names = [], []
        for s in active:
            if s.batches is None:
                s.batches = epoch_batches(len(s.train), cfg.batch_size, cfg.seed, s.epoch, d)
            idx = s.batches[s.pos]
            parts.append((s, idx))
            names += [s.name] * len(idx)
        t0 = time.perf_counter()
        batch = _concat([s.train.batch(idx, d.device) for s, idx in parts], active[0].train.pad_id)
        enc.train()
        for s in active:
            s.head.train()
        with amp():
            with route(enc, **{kind: names}):
                hidden = enc(**batch).last_hidden_state
            total, a = 0.0, 0
            losses = []
            for s, idx in parts:
                b = a + len(idx)
                logits = s.head(hidden[a:b], batch["attention_mask"][a:b])
                loss = F.cross_entropy(logits.float(), s.train.labels[idx].to(d.device))
                losses.append(loss.detach())
                total = total + (loss + fusion_regularization_loss(enc, s.name) if reg else loss)
                a = b
        total.backward()
        for s, loss in zip(active, losses):
            s.optimizer_step(cfg.max_grad_norm)
            s.loss_sum += float(loss)
            s.loss_count += 1
            s.pos += 1
        for p in enc.parameters():
            p.grad = None
        train_time += time.perf_counter() - t0
        bar.update(len(active))
        for s in active:
            if s.pos == len(s.batches):
                _epoch_end(cfg, d, enc, s, kind, amp)
    bar.close()
    for s in states:
        if s.best_state is not None:
            s.restore(s.best_state)
    return train_time


def _epoch_end(cfg, d: Dist, enc: nn.Module, s: _Task, kind: str, amp) -> None:
    acc = evaluate(TaskView(enc, s.head, kind, s.name), s.dev, cfg.eval_batch_size, d, amp)
    train_loss = s.loss_sum / max(s.loss_count, 1)
    s.history.append({"epoch": s.epoch + 1, "train_loss": train_loss, "dev_accuracy": acc, "step": s.step,
                      "lr": s.sched.get_last_lr()[0]})
    improved, s.bad, stop = dev_rule(s.best_acc, s.bad, acc, cfg.patience)
    if improved:
        s.best_acc, s.best_epoch = acc, s.epoch + 1
        s.best_state = s.snapshot()
    log(d, f"[{kind}:{s.name}] epoch {s.epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, dev accuracy {acc:.4f}"
           + (" (best)" if improved else f" (best {s.best_acc:.4f} @ epoch {s.best_epoch})"))
    s.epoch += 1
    s.batches, s.pos, s.loss_sum, s.loss_count = None, 0, 0.0, 0
    if stop:
        log(d, f"[{kind}:{s.name}] early stop: no dev improvement for {cfg.patience} epochs")
        s.finished = True
    if s.epoch >= cfg.epochs:
        s.finished = True


def _result(s: _Task, train_time: float, amp_name: str) -> dict:
    return {"history": s.history, "best_dev_accuracy": s.best_acc, "best_epoch": s.best_epoch, "global_step": s.step,
            "train_time_s": train_time, "amp": amp_name}


def _start(cfg, d: Dist):
    """A joint run's checks, clock, model folder and tokenizer."""
    check_parallel(cfg, d)
    t_start = time.perf_counter()
    model_dir = check_model_dir(cfg.model)
    return t_start, model_dir, load_tokenizer(model_dir)


# ------------------------------------------------------------------------------------ stage 1
def train_adapters_parallel(cfg, tasks: Sequence[TaskData], d: Dist) -> dict:
    """Stage 1 for every task in one run (module doc); writes what :func:`.stages.train_adapters` writes."""
    from .stages import adapter_config, seed_all

    t_start, model_dir, tok = _start(cfg, d)
    acfg = adapter_config(cfg)
    base = load_base_model(model_dir)
    encoded = {t.name: encode_task(tok, t, cfg.max_length) for t in tasks}
    names = [t.name for t in tasks]
    enc = copy.deepcopy(base)
    freeze(enc)
    patch_bert(enc, names, acfg, fusion_config=False, backend=cfg.backend)
    blocks = [b for _, b in fused_blocks(enc)]
    heads: Dict[str, ClassificationHead] = {}
    for i, t in enumerate(tasks):  # each task's adapter and head drawn as its own run draws them
        seed_all(cfg.seed)
        one = copy.deepcopy(base)
        freeze(one)
        patch_bert(one, [t.name], acfg, fusion_config=False, backend=cfg.backend)
        heads[t.name] = ClassificationHead(enc.config.hidden_size, t.num_labels, cfg.pooling, cfg.head_dropout)
        with torch.no_grad():
            for b, ob in zip(blocks, [b for _, b in fused_blocks(one)]):
                for pn in ("down_weight", "down_bias", "up_weight", "up_bias"):
                    getattr(b, pn)[i].copy_(getattr(ob, pn)[0])
        del one
    for b in blocks:
        b.freeze_adapters(False)
    enc.to(d.device)
    states = []
    for i, t in enumerate(tasks):
        rows = [_Row(getattr(b, pn), i) for b in blocks for pn in ("down_weight", "down_bias", "up_weight", "up_bias")]
        head = heads[t.name].to(d.device)
        tr, dv = encoded[t.name]
        states.append(_Task(t, tr, dv, head, [r.proxy for r in rows], rows, cfg, d))
        n_train = sum(r.proxy.numel() for r in rows) + sum(p.numel() for p in head.parameters())
        log(d, f"[adapters] {t.summary()}; {n_train} trainable parameters")
    log(d, f"[adapters] training {names} in one run (--parallel): each batch mixes the tasks, each sequence through "
           "its own adapter and head")
    train_time = _joint_loop(cfg, d, enc, states, "adapter", reg=False)
    wall = time.perf_counter() - t_start
    _, amp_name = amp_context(cfg, d.device)
    metrics = dict(env_info(d), stage="adapters", model=model_dir, data_note=data_note(tasks),
                   adapter_config=acfg.to_dict(), settings=settings(cfg), tasks={},
                   parallel={"tasks": names, "wall_time_s": wall, "train_time_s": train_time})
    out = {"models": {}, "metrics": metrics}
    written = save_adapterhub(enc, os.path.join(cfg.output_dir, "adapters")) if d.main else {}
    for s in states:
        t = s.task
        n_train = sum(r.proxy.numel() for r in s.rows) + sum(p.numel() for p in s.head.parameters())
        rec = dict(task_record(t), **_result(s, train_time, amp_name), trainable_parameters=n_train,
                   adapter_config=acfg.to_dict(), settings=settings(cfg), trained_jointly_with=names)
        if d.main:
            rec["adapter_dir"] = written[t.name]
            rec["head_dir"] = save_head(s.head, os.path.join(cfg.output_dir, "heads", t.name),
                                        {"task": t.name, "label_names": t.label_names, "generated": t.generated})
            write_adapter_metrics(cfg.output_dir, dict(metrics, tasks={t.name: rec}), cfg.overwrite)
        metrics["tasks"][t.name] = rec
        out["models"][t.name] = TaskView(enc, s.head, "adapter", t.name)
        log(d, f"[adapters] {t.name}: best dev accuracy {s.best_acc:.4f} (epoch {s.best_epoch})")
    log(d, f"[adapters] {len(tasks)} tasks in one run: {wall:.1f} s wall, {train_time:.1f} s in training steps")
    return out


# ------------------------------------------------------------------------------------ stage 2
def _standalone(enc: nn.Module, fusion: str, names: List[str]) -> nn.Module:
    """A copy of the joint model holding only fusion ``fusion``, under AdapterHub's name
    ``"a,b,c"`` and active: the model a one-task run trains (for saving, analysis, pruning)."""
    one = copy.deepcopy(enc)
    default = ",".join(names)
    for _, b in fused_blocks(one):
        keep = b.fusions[fusion]
        for k in list(b.fusions):
            del b.fusions[k]
        b.fusions[default] = keep
        b.set_active_fusion(default)
        b.invalidate_folded()
    return one


def train_fusion_parallel(cfg, tasks: Sequence[TaskData], adapter_dirs: Sequence[str], d: Dist) -> dict:
    """Stage 2 for several target tasks in one run (module doc): one fusion per task over all the
    adapters, named by the task; writes for each task what :func:`.stages.train_fusion` writes."""
    from .stages import fusion_config, save_fusion_outputs, seed_all

    t_start, model_dir, tok = _start(cfg, d)
    dirs = resolve_adapter_dirs(adapter_dirs)
    fcfg = fusion_config(cfg)
    enc, names, heads = None, None, {}
    for t in tasks:  # each task's fusion and head drawn as its own run draws them
        seed_all(cfg.seed)
        one, names = build_fusion_model(load_base_model(model_dir), dirs, fcfg, cfg.backend)
        heads[t.name] = ClassificationHead(one.config.hidden_size, t.num_labels, cfg.pooling, cfg.head_dropout)
        if cfg.prune_k is not None and not 1 <= cfg.prune_k <= len(names):
            raise TrainError(f"--prune-k {cfg.prune_k} must be between 1 and the number of adapters ({len(names)})")
        default = ",".join(names)
        if enc is None:
            enc = one
            for _, b in fused_blocks(enc):
                f = b.fusions[default]
                del b.fusions[default]
                b.fusions[t.name] = f
                b.set_active_fusion(t.name)
        else:
            for (_, b), (_, ob) in zip(fused_blocks(enc), fused_blocks(one)):
                f = b.add_fusion(t.name, names, fcfg, score_dropout=ob.fusions[default].score_dropout)
                f.load_state_dict(ob.fusions[default].state_dict())
                for p, q in zip(f.parameters(), ob.fusions[default].parameters()):
                    p.requires_grad_(q.requires_grad)
        del one
    enc.to(d.device)
    encoded = {t.name: encode_task(tok, t, cfg.max_length) for t in tasks}
    states = []
    blocks = [b for _, b in fused_blocks(enc)]
    for t in tasks:
        body = [p for b in blocks for p in b.fusions[t.name].parameters() if p.requires_grad]
        head = heads[t.name].to(d.device)
        tr, dv = encoded[t.name]
        states.append(_Task(t, tr, dv, head, body, [], cfg, d))
        n_train = sum(p.numel() for p in body) + sum(p.numel() for p in head.parameters())
        log(d, f"[fusion] {t.summary()}; fusing {names}; {n_train} trainable parameters (fusion + head)")
    log(d, f"[fusion] training the fusions of {[t.name for t in tasks]} in one run: each batch mixes the tasks, each "
           "sequence through its own fusion and head")
    reg = fcfg.regularization and fcfg.value
    train_time = _joint_loop(cfg, d, enc, states, "fusion", reg=reg)
    wall = time.perf_counter() - t_start
    amp, amp_name = amp_context(cfg, d.device)
    out = {"models": {}, "names": names, "metrics": {}, "parallel": {"tasks": [t.name for t in tasks],
                                                                    "wall_time_s": wall, "train_time_s": train_time}}
    for s in states:
        t = s.task
        one = _standalone(enc, t.name, names)
        clf = AdapterClassifier(one, s.head)
        n_train = sum(p.numel() for p in s.body) + sum(p.numel() for p in s.head.parameters())
        metrics = dict(env_info(d), stage="fusion", model=model_dir, data_note=data_note([t]), adapters=names,
                       adapter_dirs=dirs, fusion_config=fcfg.to_dict(), settings=settings(cfg),
                       task=dict(task_record(t), **_result(s, train_time, amp_name), trainable_parameters=n_train),
                       parallel=out["parallel"])
        if d.main:
            save_fusion_outputs(cfg, d, t, clf, one, s.head, names, s.dev, metrics, amp)
        out["models"][t.name] = clf
        out["metrics"][t.name] = metrics
        log(d, f"[fusion] {t.name}: best dev accuracy {s.best_acc:.4f} (epoch {s.best_epoch})")
    log(d, f"[fusion] {len(tasks)} target tasks in one run: {wall:.1f} s wall, {train_time:.1f} s in training steps")
    return out

