"""The two stages of AdapterFusion training (Pfeiffer et al., 2021).

Stage 1 (:func:`train_adapters`): one single-task adapter per task on a frozen BERT-family model
(blocks built with ``fusion_config=False``), each with its own classification head.
Stage 2 (:func:`train_fusion`): the chosen adapters are loaded frozen, an AdapterFusion layer and a
fresh head are trained on the target task with AdapterHub's value regularisation; then the mean
fusion weights on the dev set, optionally a pruned model (``--prune-k``), the metrics, and last
the heatmap (an optional figure: a failure there loses nothing).
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .. import (AdapterConfig, FusionConfig, fused_blocks, fusion_weights, patch_bert, plot_fusion_weights,
               record_fusion_weights, save_adapterhub)
from .batches import Encoded, encode_task
from .checkpoint import check_fingerprint, load_checkpoint, set_temperatures, temperatures
from .data import TaskData
from .dist import Dist, barrier, log, params_in_sync
from .errors import TrainError
from .heads import AdapterClassifier, ClassificationHead, save_head
from .loop import amp_context, evaluate, train_task
from .metrics import data_note, env_info, settings, task_record, write_adapter_metrics, write_fusion_metrics
from .models import build_fusion_model, check_model_dir, freeze, load_base_model, load_tokenizer, resolve_adapter_dirs
from .preflight import adapter_outputs, fusion_outputs
from .prune import most_used, prune_model, pruning_report, save_pruned, timed_passes

__all__ = ["train_adapters", "train_fusion", "adapter_config", "adapter_fingerprint", "fusion_config", "mean_fusion_weights",
           "PAPER"]

# the paper's settings (Pfeiffer et al., 2021, section 4): the CLI defaults of the two stages
PAPER = dict(adapter_lr=1e-4, fusion_lr=5e-5, adapter_epochs=30, fusion_epochs=10)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def fingerprint(cfg, task: TaskData, **extra) -> dict:
    """What a checkpoint must have been written with to be resumed: the training settings and
    the data's content hash."""
    keys = ("lr", "head_lr", "epochs", "batch_size", "seed", "max_length", "weight_decay", "warmup_ratio",
            "patience", "pooling", "max_grad_norm")
    fp = {k: getattr(cfg, k) for k in keys}
    fp.update(extra, task=task.name, data=task.fingerprint())
    return fp


def adapter_config(cfg) -> AdapterConfig:
    if cfg.adapter_config == "houlsby":
        return AdapterConfig.houlsby(reduction_factor=cfg.reduction_factor)
    return AdapterConfig.pfeiffer(reduction_factor=cfg.reduction_factor, non_linearity=cfg.non_linearity)


def adapter_fingerprint(cfg, task: TaskData) -> dict:
    return fingerprint(cfg, task, stage="adapters", adapter_config=adapter_config(cfg).to_dict())


def check_resumable(cfg, units: Sequence[Tuple[str, dict]]) -> None:
    """With --resume, compare every (checkpoint, fingerprint) before any training starts."""
    if not cfg.resume:
        return
    for path, fp in units:
        if os.path.isfile(path):
            check_fingerprint(path, load_checkpoint(path)["fingerprint"], fp)


def _fresh_start(cfg, ckpt: str) -> None:
    """Without --resume a unit starts over: drop its old checkpoint (there is one only with --overwrite)."""
    if not cfg.resume and os.path.exists(ckpt):
        os.remove(ckpt)


# ------------------------------------------------------------------------------------ stage 1
def train_adapters(cfg, tasks: Sequence[TaskData], d: Dist) -> dict:
    """Stage 1: one adapter (+ head) per task; writes adapters/<task>, heads/<task>, and adds the
    tasks to metrics_adapters.json."""
    model_dir = check_model_dir(cfg.model)
    tok = load_tokenizer(model_dir)
    acfg = adapter_config(cfg)
    base = load_base_model(model_dir)
    encoded = {t.name: encode_task(tok, t, cfg.max_length) for t in tasks}  # all data checked before training
    ckpts = {t.name: adapter_outputs(cfg.output_dir, t.name)["checkpoint"][0] for t in tasks}
    check_resumable(cfg, [(ckpts[t.name], adapter_fingerprint(cfg, t)) for t in tasks])
    metrics = dict(env_info(d), stage="adapters", model=model_dir, data_note=data_note(tasks),
                   adapter_config=acfg.to_dict(), settings=settings(cfg), tasks={})
    out = {"models": {}, "metrics": metrics}
    for t in tasks:
        seed_all(cfg.seed)
        enc = copy.deepcopy(base)
        freeze(enc)
        patch_bert(enc, [t.name], acfg, fusion_config=False, backend=cfg.backend)
        for _, b in fused_blocks(enc):
            b.freeze_adapters(False)
        head = ClassificationHead(enc.config.hidden_size, t.num_labels, cfg.pooling, cfg.head_dropout)
        clf = AdapterClassifier(enc, head).to(d.device)
        n_train = sum(p.numel() for p in clf.parameters() if p.requires_grad)
        log(d, f"[adapters] {t.summary()}; {n_train} trainable parameters")
        tr, dv = encoded[t.name]
        if d.main:
            _fresh_start(cfg, ckpts[t.name])
        barrier(d)
        res = train_task(clf, tr, dv, cfg, d, ckpts[t.name], adapter_fingerprint(cfg, t), f"adapter:{t.name}")
        if res["interrupted"]:
            out.update(interrupted=True, reason=res["reason"])
            return out
        rec = dict(task_record(t), **{k: v for k, v in res.items() if k != "interrupted"}, trainable_parameters=n_train,
                   adapter_config=acfg.to_dict(), settings=settings(cfg))
        if d.main:
            rec["adapter_dir"] = save_adapterhub(enc, os.path.join(cfg.output_dir, "adapters"))[t.name]
            rec["head_dir"] = save_head(head, os.path.join(cfg.output_dir, "heads", t.name),
                                        {"task": t.name, "label_names": t.label_names, "generated": t.generated})
            write_adapter_metrics(cfg.output_dir, dict(metrics, tasks={t.name: rec}), cfg.overwrite)
        metrics["tasks"][t.name] = rec
        out["models"][t.name] = clf
        log(d, f"[adapters] {t.name}: best dev accuracy {res['best_dev_accuracy']:.4f} (epoch {res['best_epoch']})")
    barrier(d)
    return out


# ------------------------------------------------------------------------------------ stage 2
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


def fusion_config(cfg) -> FusionConfig:
    make = FusionConfig.static if cfg.fusion == "static" else FusionConfig.dynamic
    return make(temperature=cfg.fusion_temperature, regularization=not cfg.no_regularization and cfg.fusion != "static")


def _timed_eval(clf: nn.Module, enc: Encoded, batch_size: int, d: Dist, amp) -> Tuple[float, float]:
    """(dev accuracy, seconds) of one full dev pass on this process."""
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    t0 = time.perf_counter()
    acc = evaluate(clf, enc, batch_size, d, amp, distributed=False)
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    return acc, time.perf_counter() - t0


def _prune(cfg, clf: AdapterClassifier, enc_model: nn.Module, head, names: List[str], weights, dv: Encoded, d: Dist,
           amp, fdir: str, fusion_dir: str) -> Tuple[dict, AdapterClassifier]:
    """Prune to the ``--prune-k`` most-used adapters per layer, save it, and compare it with the
    full fusion on the dev set (accuracy and time)."""
    temps = temperatures(clf)
    keep = most_used(weights, cfg.prune_k)
    pruned = AdapterClassifier(prune_model(copy.deepcopy(enc_model), keep), head)
    runs = timed_passes(lambda m: _timed_eval(m, dv, cfg.eval_batch_size, d, amp), {"full": clf, "pruned": pruned})
    set_temperatures(clf, temps)  # the timing passes anneal the temperature of both
    set_temperatures(pruned, temps)
    pruned.eval()
    path = save_pruned(os.path.join(fdir, f"pruned-k{cfg.prune_k}.json"), pruned.encoder, cfg.prune_k, names, fusion_dir)
    report = pruning_report(cfg.prune_k, keep, names, runs, path)
    log(d, f"[fusion] pruned to k={cfg.prune_k} adapters per layer: dev accuracy {report['dev_accuracy_full']:.4f} -> "
           f"{report['dev_accuracy_pruned']:.4f}, dev-set inference {report['dev_eval_seconds_full'] * 1e3:.0f} ms -> "
           f"{report['dev_eval_seconds_pruned'] * 1e3:.0f} ms ({report['speedup']:.2f}x); saved {path} "
           "(afkern.train.load_classifier(..., pruned=PATH) rebuilds it)")
    return report, pruned


def train_fusion(cfg, task: TaskData, adapter_dirs: Sequence[str], d: Dist) -> dict:
    """Stage 2: fusion + fresh head on ``task``; writes fusion-<task>/ (AdapterHub directories, the
    head, ``pruned-k<k>.json`` with --prune-k), metrics_fusion.json, then the heatmap."""
    model_dir = check_model_dir(cfg.model)
    tok = load_tokenizer(model_dir)
    dirs = resolve_adapter_dirs(adapter_dirs)
    fcfg = fusion_config(cfg)
    seed_all(cfg.seed)
    enc_model, names = build_fusion_model(load_base_model(model_dir), dirs, fcfg, cfg.backend)
    if cfg.prune_k is not None and not 1 <= cfg.prune_k <= len(names):
        raise TrainError(f"--prune-k {cfg.prune_k} must be between 1 and the number of adapters ({len(names)})")
    tr, dv = encode_task(tok, task, cfg.max_length)
    head = ClassificationHead(enc_model.config.hidden_size, task.num_labels, cfg.pooling, cfg.head_dropout)
    clf = AdapterClassifier(enc_model, head).to(d.device)
    n_train = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    log(d, f"[fusion] {task.summary()}; fusing {names}; {n_train} trainable parameters (fusion + head)")
    ckpt = fusion_outputs(cfg.output_dir, task.name)["checkpoint"][0]
    fp = fingerprint(cfg, task, stage="fusion", adapters=names, fusion=fcfg.to_dict())
    if d.main:
        _fresh_start(cfg, ckpt)
    barrier(d)
    res = train_task(clf, tr, dv, cfg, d, ckpt, fp, f"fusion:{task.name}", reg=fcfg.regularization and fcfg.value)
    out = {"model": clf, "names": names}
    if res["interrupted"]:
        out.update(interrupted=True, reason=res["reason"])
        return out
    metrics = dict(env_info(d), stage="fusion", model=model_dir, data_note=data_note([task]), adapters=names,
                   adapter_dirs=dirs, fusion_config=fcfg.to_dict(), settings=settings(cfg),
                   task=dict(task_record(task), **{k: v for k, v in res.items() if k != "interrupted"},
                             trainable_parameters=n_train))
    out["metrics"] = metrics
    if cfg.check_sync and d.enabled:
        metrics["ddp_params_in_sync"] = params_in_sync(clf, d)
    if d.main:
        amp, _ = amp_context(cfg, d.device)
        out["pruned_model"] = save_fusion_outputs(cfg, d, task, clf, enc_model, head, names, dv, metrics, amp)
        log(d, f"[fusion] {task.name}: best dev accuracy {res['best_dev_accuracy']:.4f}")
    barrier(d)
    return out

def save_fusion_outputs(cfg, d, task, clf, enc_model, head, names, dev, metrics, amp):
    """Write what stage 2 leaves for one target task, in this order: the AdapterHub directories
    (adapters and fusion) and the head, the metrics, the pruned model (``--prune-k``), the heatmap
    (optional: a failure is reported and recorded, never lost work). Returns the pruned model or None."""
    fdir = os.path.join(cfg.output_dir, f"fusion-{task.name}")
    png = os.path.join(cfg.output_dir, f"fusion_weights-{task.name}.png")
    if cfg.overwrite:  # no stale adapter folders, pruned files or figure of the replaced run
        if os.path.isdir(fdir):
            shutil.rmtree(fdir)
        if os.path.isfile(png):
            os.remove(png)
    temps = temperatures(clf)
    written = save_adapterhub(enc_model, fdir)
    metrics["fusion_dir"] = written[",".join(names)]
    metrics["saved_adapter_dirs"] = [written[n] for n in names]
    metrics["head_dir"] = save_head(head, os.path.join(fdir, "classifier"),
                                    {"task": task.name, "label_names": task.label_names, "adapters": names,
                                     "generated": task.generated, "fusion_temperatures": temperatures(enc_model)})
    weights = mean_fusion_weights(clf, dev, cfg.eval_batch_size, d.device, amp)
    set_temperatures(clf, temps)  # the dev pass must not move the annealed temperature
    metrics["mean_fusion_weights"] = {k: dict(zip(names, v.tolist())) for k, v in weights.items()}
    metrics["heatmap"] = None
    write_fusion_metrics(cfg.output_dir, metrics, cfg.overwrite)
    pruned = None
    if cfg.prune_k is not None:
        metrics["pruning"], pruned = _prune(cfg, clf, enc_model, head, names, weights, dev, d, amp, fdir,
                                            metrics["fusion_dir"])
        write_fusion_metrics(cfg.output_dir, metrics, cfg.overwrite)
    log(d, f"[fusion] {task.name}: saved {fdir} and {os.path.join(cfg.output_dir, 'metrics_fusion.json')}")
    if not cfg.no_heatmap:
        title = f"{task.name}: dev set" + ("\n(GENERATED data)" if task.generated else "")
        try:
            metrics["heatmap"] = plot_fusion_weights(weights, names, png, title)
            log(d, f"[fusion] heatmap {metrics['heatmap']}")
        except Exception as exc:  # an optional figure: report it, keep everything else
            metrics["heatmap_error"] = f"{type(exc).__name__}: {exc}"
            print(f"afkern-train: warning: the heatmap {png} could not be drawn ({metrics['heatmap_error']}); "
                  "the model and metrics are saved", file=sys.stderr, flush=True)
        write_fusion_metrics(cfg.output_dir, metrics, cfg.overwrite)
    return pruned

