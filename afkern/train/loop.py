"""The training loop of one task: AdamW with linear warm-up and decay, early stopping on dev
accuracy, checkpoints at epoch ends (and every ``--save-every`` steps), ``--resume``, and a clean
stop on Ctrl-C.

Ctrl-C (SIGINT) during training sets a flag: the current optimizer step finishes, a checkpoint of
the work so far is written, and the run returns ``interrupted`` with the ``--resume`` hint; a
second Ctrl-C aborts the step at once (the checkpoint then holds the last finished step). A
``KeyboardInterrupt`` raised inside a step by other means is handled the same way: RNG state and
fusion temperatures are saved as they were when that step began, so the resumed run repeats it
exactly; one raised while the optimizer was updating keeps the previous checkpoint instead.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
import threading
import time
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import fusion_regularization_loss
from .batches import Encoded, epoch_batches
from .checkpoint import (CKPT_FORMAT, check_fingerprint, load_checkpoint, load_trainable_state, save_checkpoint,
                         set_temperatures, temperatures, trainable_state)
from .dist import Dist, all_reduce_sum, any_rank, barrier, log, shard

__all__ = ["amp_context", "evaluate", "train_task", "train_step", "StopGuard", "RESUME_HINT"]

RESUME_HINT = "run the same command again with --resume to continue from the checkpoint"


def amp_context(cfg, device: torch.device):
    """(context factory, name): bf16 autocast on a GPU under ``--amp auto``, else no autocast."""
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
    idx, real = shard(range(len(enc)), dd)
    correct = total = 0.0
    for i in range(0, len(idx), batch_size):
        b = idx[i:i + batch_size]
        r = torch.tensor(real[i:i + batch_size], device=d.device)
        with amp():
            logits = model(**enc.batch(b, d.device))
        hit = (logits.argmax(-1) == enc.labels[b].to(d.device)) & r
        correct += float(hit.sum())
        total += float(r.sum())
    correct, total = all_reduce_sum([correct, total], dd)
    model.train(was)
    return correct / max(total, 1.0)


class StopGuard:
    """While active (main thread only), the first SIGINT asks the loop to stop after the current
    step; a second one raises KeyboardInterrupt as usual. ``committing`` marks the optimizer update."""

    def __init__(self, quiet: bool = False):
        self.requested = False
        self.committing = False
        self.quiet = quiet
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:  # one message, not one per DDP rank
            print("\nafkern-train: Ctrl-C: stopping after this step and writing a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopGuard":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def train_step(model: nn.Module, clf: nn.Module, batch: dict, labels: torch.Tensor, opt, sched, params: List,
               cfg, amp, reg: bool, guard: StopGuard) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the (detached) cross-entropy loss."""
    with amp():
        logits = model(**batch)
        loss = F.cross_entropy(logits.float(), labels)
        total = loss + fusion_regularization_loss(clf) if reg else loss
    total.backward()
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    guard.committing = True  # cleared by the loop once the progress counters agree with the weights
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _rng_state(d: Dist) -> dict:
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None}


def dev_rule(best_acc: float, bad_epochs: int, acc: float, patience: int):
    """The stopping and selection rule after one dev evaluation: ``(improved, bad_epochs, stop)``.
    A dev accuracy strictly above the best so far is the new best (a tie keeps the earlier epoch's
    weights) and resets the count of epochs without improvement; ``stop`` once that count reaches
    ``patience`` (0: never). Pure, so it is tested on scripted dev scores (tests/test_train.py)."""
    improved = acc > best_acc
    bad_epochs = 0 if improved else bad_epochs + 1
    return improved, bad_epochs, bool(patience) and bad_epochs >= patience


def train_task(clf: nn.Module, train_enc: Encoded, dev_enc: Encoded, cfg, d: Dist, ckpt_path: str,
               fingerprint: dict, desc: str, reg: bool = False) -> dict:
    """Train the trainable parameters of ``clf`` (body at ``cfg.lr``, ``clf.head`` at ``cfg.head_lr``);
    early stopping on dev accuracy; returns the history and best accuracy and leaves the best
    weights in ``clf``, or ``{"interrupted": True, ...}`` after a stop with a checkpoint."""
    amp, amp_name = amp_context(cfg, d.device)
    body = [p for n, p in clf.named_parameters() if p.requires_grad and not n.startswith("head.")]
    head = [p for p in clf.head.parameters() if p.requires_grad]
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head, "lr": head_lr}],
                            weight_decay=cfg.weight_decay)
    batches_per_epoch = len(epoch_batches(len(train_enc), cfg.batch_size, cfg.seed, 0, d))
    total_steps = batches_per_epoch * cfg.epochs
    from transformers import get_linear_schedule_with_warmup

    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total_steps), total_steps)
    prog = dict(epoch=0, step_in_epoch=0, global_step=0, best_acc=-1.0, best_epoch=-1, bad_epochs=0,
                finished=False, history=[], loss_sum=0.0, loss_count=0, train_time=0.0)
    best_state = None
    if cfg.resume and os.path.isfile(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        check_fingerprint(ckpt_path, ck["fingerprint"], fingerprint)
        load_trainable_state(clf, ck["state"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        prog.update(ck["progress"])
        best_state = ck.get("best_state")
        set_temperatures(clf, ck["temperatures"])
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") is not None and d.device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"], d.device)
        if prog["finished"]:
            log(d, f"[{desc}] finished in {ckpt_path} (best dev accuracy {prog['best_acc']:.4f}, epoch "
                   f"{prog['best_epoch']}); not retrained (to retrain, run without --resume and with --overwrite)")
        else:
            log(d, f"[{desc}] resumed from {ckpt_path}: epoch {prog['epoch']}, step {prog['global_step']}")

    def checkpoint(snapshot: Optional[dict] = None, sync: bool = True) -> None:
        """Write the state; ``snapshot`` replaces RNG and temperatures with those of a step start."""
        if d.main:
            snap = snapshot or dict(_rng_state(d), temperatures=temperatures(clf))
            state = trainable_state(clf)
            if snapshot is not None:  # the interrupted forward may have annealed some temperatures
                live = temperatures(clf)
                set_temperatures(clf, snap["temperatures"])
                state = trainable_state(clf)
                set_temperatures(clf, live)
            save_checkpoint(ckpt_path, {
                "format": CKPT_FORMAT, "fingerprint": fingerprint, "state": state,
                "best_state": best_state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "progress": copy.deepcopy(prog), "temperatures": snap["temperatures"], "rng": snap["rng"],
                "cuda_rng": snap["cuda_rng"],
            })
        if sync:
            barrier(d)

    model: nn.Module = clf
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(clf, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from tqdm.auto import tqdm

    def stopped(reason: str, saved: bool = True) -> dict:
        where = f"checkpoint in {ckpt_path}" if saved else f"the last checkpoint ({ckpt_path}) is kept"
        log(d, f"[{desc}] stopped after step {prog['global_step']} ({reason}); {where}; {RESUME_HINT}")
        return {"interrupted": True, "reason": reason, "global_step": prog["global_step"], "checkpoint": ckpt_path}

    guard = StopGuard(quiet=not d.main)
    snapshot: Optional[dict] = None
    bar = None
    with guard:
        try:
            while not prog["finished"] and prog["epoch"] < cfg.epochs:
                epoch = prog["epoch"]
                batches = epoch_batches(len(train_enc), cfg.batch_size, cfg.seed, epoch, d)
                skip = prog["step_in_epoch"]
                model.train()
                bar = tqdm(total=len(batches), initial=skip, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
                           disable=not d.main or cfg.no_progress, leave=False, dynamic_ncols=True)
                t0, seen = time.perf_counter(), 0
                for b in batches[skip:]:
                    if any_rank(guard.requested, d):
                        prog["train_time"] += time.perf_counter() - t0
                        checkpoint()
                        return stopped("Ctrl-C")
                    snapshot = dict(_rng_state(d), temperatures=temperatures(clf))
                    batch = train_enc.batch(b, d.device)
                    loss = train_step(model, clf, batch, train_enc.labels[b].to(d.device), opt, sched, body + head,
                                      cfg, amp, reg, guard)
                    prog["global_step"] += 1
                    prog["step_in_epoch"] += 1
                    prog["loss_sum"] += float(loss)
                    prog["loss_count"] += 1
                    snapshot = None
                    guard.committing = False
                    seen += len(b) * d.world
                    dt = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{prog['loss_sum'] / prog['loss_count']:.4f}",
                                    ex_per_s=f"{seen / max(dt, 1e-9):.1f}")
                    bar.update(1)
                    if cfg.save_every and prog["global_step"] % cfg.save_every == 0:
                        checkpoint()
                    if cfg.stop_after_steps and prog["global_step"] >= cfg.stop_after_steps:
                        prog["train_time"] += time.perf_counter() - t0
                        checkpoint()
                        return stopped("--stop-after-steps")
                bar.close()
                prog["train_time"] += time.perf_counter() - t0
                # epoch end: the dev pass anneals the temperature too, so an interrupt restores it
                snapshot = dict(_rng_state(d), temperatures=temperatures(clf))
                acc = evaluate(clf, dev_enc, cfg.eval_batch_size, d, amp)
                train_loss = all_reduce_sum([prog["loss_sum"], prog["loss_count"]], d)
                train_loss = train_loss[0] / max(train_loss[1], 1)
                improved, bad, stop = dev_rule(prog["best_acc"], prog["bad_epochs"], acc, cfg.patience)
                new = copy.deepcopy(prog)
                new["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "dev_accuracy": acc,
                                       "step": new["global_step"], "lr": sched.get_last_lr()[0]})
                new["bad_epochs"] = bad
                if improved:
                    new["best_acc"], new["best_epoch"] = acc, epoch + 1
                new.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0)
                new_best = trainable_state(clf) if improved else best_state
                prog, best_state, snapshot = new, new_best, None  # one step: an interrupt sees old or new
                log(d, f"[{desc}] epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, dev accuracy {acc:.4f}"
                       + (" (best)" if improved else f" (best {prog['best_acc']:.4f} @ epoch {prog['best_epoch']})"))
                if stop:
                    log(d, f"[{desc}] early stop: no dev improvement for {cfg.patience} epochs")
                    prog["finished"] = True
                if prog["epoch"] >= cfg.epochs:
                    prog["finished"] = True
                checkpoint()
            if any_rank(guard.requested, d):  # Ctrl-C during the last dev pass: the task is done and saved
                return stopped("Ctrl-C")
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            if guard.committing:  # the weights may be half updated: keep the last checkpoint
                return stopped("Ctrl-C during an optimizer update", saved=False)
            opt.zero_grad(set_to_none=True)
            checkpoint(snapshot, sync=False)
            return stopped("Ctrl-C")
    if best_state is not None:
        load_trainable_state(clf, best_state)
    return {"interrupted": False, "history": prog["history"], "best_dev_accuracy": prog["best_acc"],
            "best_epoch": prog["best_epoch"], "global_step": prog["global_step"], "train_time_s": prog["train_time"],
            "amp": amp_name}
