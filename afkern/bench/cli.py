"""``afkern-bench``'s command line: the options, their defaults, and one run from end to end.

A run: resolve the options (:func:`resolve_args`), claim this machine's results folder
(``<output-dir>/<device-slug>/``, refused if it holds another machine's results), run the sweep
with a progress bar on stderr (:mod:`.sweep`), then print the table, the fits and the targets and
write ``bench.csv`` (also after every N, so an interrupted run keeps what it measured),
``results.md`` and the plots (:mod:`.report`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

import torch

from . import env
from .cases import BLOCK_MODES, MODEL_MODES, tokens_shape
from .fits import linear_fits, model_slopes
from .models import FAMILIES, BenchShape
from .progress import Progress
from .providers import PROVIDERS, default_providers
from .report import format_summary, write_csv, write_markdown, write_plots
from .sweep import run_sweep, sweep_cost
from .targets import target_lines
from .timing import default_warmup_ms

__all__ = ["main", "build_parser", "resolve_args", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _int_list(s: str) -> List[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _str_list(s: str) -> List[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="afkern-bench",
        description="Cost of AdapterFusion: afkern's fused block and a whole model against AdapterHub's adapters "
                    "and the plain model, against the number of fused adapters N. Prints a table; writes CSV, PNG "
                    "plots and results.md under OUTPUT_DIR/<device-slug>/ (one folder per CPU model or GPU). Every "
                    "provider is checked against a float64 run of afkern's reference before it is timed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="small sweep (block N=1,4,16 at 256 tokens; 4-layer model at N=1,16, 128 tokens; 5 repeats); "
                        "reference only as the correctness oracle, not timed, unless named in --providers")
    p.add_argument("--output-dir", default="bench-results",
                   help="results go to OUTPUT_DIR/<device-slug>/ (the CPU model or the GPU name); a folder holding "
                        "another machine's results is never overwritten")
    p.add_argument("--family", type=_str_list, default=["bert"],
                   help=f"comma-separated model families, from {sorted(FAMILIES)}")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:K (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--providers", type=_str_list, default=None,
                   help=f"comma-separated, from {sorted(PROVIDERS)}; default: plain, plain_layer, adapters and every "
                        "afkern backend that can run on the device")
    p.add_argument("--n-adapters", type=_int_list, default=None, help="block: N values (default 1,2,4,8,16,32,64)")
    p.add_argument("--tokens", type=_int_list, default=None, help="block: token counts B*S (default 256,1024)")
    p.add_argument("--modes", type=_str_list, default=None, help=f"block modes from {list(BLOCK_MODES)} (default all)")
    p.add_argument("--model-n-adapters", type=_int_list, default=None, help="whole model: N values (default 1,4,16,64)")
    p.add_argument("--model-tokens", type=_int_list, default=None, help="whole model: token counts B*S (default 512)")
    p.add_argument("--model-modes", type=_str_list, default=None, help=f"model modes from {list(MODEL_MODES)} (default all)")
    p.add_argument("--layers", type=int, default=None, help="whole model: layers (default 12; 4 with --quick)")
    p.add_argument("--no-block", action="store_true", help="skip the block benchmark")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model benchmark")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length S; a token count T runs as [T/S, S] (or [1, T] if T <= S)")
    p.add_argument("--hidden-size", type=int, default=768, help="d")
    p.add_argument("--intermediate-size", type=int, default=3072, help="the feed-forward width (BertOutput's input)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (plain_layer and the model)")
    p.add_argument("--reduction-factor", type=int, default=16, help="adapter bottleneck r = d / reduction factor")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per case (default 10; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="at least this many warm-up calls per case in every group (default 2 on CPU, 10 on CUDA)")
    p.add_argument("--warmup-ms", type=float, default=None,
                   help="and at least this long per case, until it stops getting faster (default 250 on CPU, 100 on CUDA)")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="a sample repeats the call until it lasts this long (default 20 on CPU, 5 on CUDA)")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="CPU timer: wall (perf_counter) or process (CPU time of all threads of this process: "
                        "robust to other processes on a shared machine, best with --threads 1); CUDA always uses events")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default, reported)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--check-tokens", type=int, default=None,
                   help="run the correctness guard (and its float64 oracle) on at most this many tokens of each "
                        "case instead of all of them; large GPU cases need it (default: all)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (log lines only)")
    from . import accelerate, decode, multifusion

    multifusion.add_arguments(p)
    decode.add_arguments(p)
    accelerate.add_arguments(p)
    return p


def resolve_args(args) -> dict:
    """The run's configuration from the parsed options (defaults filled, every value checked);
    ``SystemExit`` with a message naming the option for a bad one."""
    q = args.quick
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("afkern-bench: --device cuda asked for, but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"afkern-bench: --device must be cpu or cuda[:K], got {args.device!r}")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    bad = [f for f in args.family if f not in FAMILIES]
    if bad or not args.family:
        raise SystemExit(f"afkern-bench: unknown --family {bad or args.family}; expected names from {sorted(FAMILIES)}")
    provs = args.providers
    if provs is not None:
        bad = [p for p in provs if p not in PROVIDERS]
        if bad:
            raise SystemExit(f"afkern-bench: unknown provider(s) {bad}; expected names from {sorted(PROVIDERS)}")
    else:
        provs = default_providers(device)
        if q:
            provs = [p for p in provs if p != "reference"]
    for name, given, allowed in (("--modes", args.modes, BLOCK_MODES), ("--model-modes", args.model_modes, MODEL_MODES)):
        if given is not None and (not given or any(m not in allowed for m in given)):
            raise SystemExit(f"afkern-bench: {name} must be from {list(allowed)}, got {given}")
    for name in ("layers", "repeats", "warmup", "warmup_ms", "seq_len", "threads"):
        v = getattr(args, name)
        if v is not None and v < (0 if name in ("warmup", "warmup_ms") else 1):
            raise SystemExit(f"afkern-bench: --{name.replace('_', '-')} must be positive, got {v}")
    cfg = dict(
        device=device, dtype=dtype, providers=list(dict.fromkeys(provs)), families=list(dict.fromkeys(args.family)),
        kinds=[k for k in ("block", "model") if not getattr(args, f"no_{k}")],
        block_n=args.n_adapters or ([1, 4, 16] if q else [1, 2, 4, 8, 16, 32, 64]),
        block_tokens=args.tokens or ([256] if q else [256, 1024]),
        block_modes=args.modes or list(BLOCK_MODES),
        model_n=args.model_n_adapters or ([1, 4, 16] if q else [1, 4, 16, 64]),
        model_tokens=args.model_tokens or ([128] if q else [512]),
        model_modes=args.model_modes or list(MODEL_MODES),
        layers=args.layers or (4 if q else 12),
        repeats=args.repeats or (5 if q else 10),
        warmup=args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2),
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else default_warmup_ms(device),
        min_sample_ms=args.min_sample_ms or (5.0 if device.type == "cuda" else 20.0),
        shape=BenchShape(args.hidden_size, args.intermediate_size, args.heads, args.reduction_factor),
        seq_len=args.seq_len, seed=args.seed, clock=args.clock, check_tokens=args.check_tokens,
    )
    if args.check_tokens is not None and args.check_tokens < 1:
        raise SystemExit(f"afkern-bench: --check-tokens must be positive, got {args.check_tokens}")
    for t in cfg["block_tokens"] + cfg["model_tokens"]:
        try:
            tokens_shape(t, args.seq_len)
        except ValueError as exc:
            raise SystemExit(f"afkern-bench: {exc}") from None
    try:
        cfg["shape"].validate()
    except ValueError as exc:
        raise SystemExit(f"afkern-bench: {exc}") from None
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:  # main() may be called in-process (tests): leave torch's thread count as found
        torch.set_num_threads(threads_before)


def _run(args, argv: List[str]) -> int:
    cfg = resolve_args(args)
    device = cfg["device"]
    out_dir = env.results_dir(args.output_dir, device)  # refuses another machine's folder before any work
    if getattr(args, "multifusion", False) and getattr(args, "decode", False):
        raise SystemExit("afkern-bench: --multifusion and --decode are separate runs; choose one")
    if getattr(args, "multifusion", False):
        from . import multifusion

        return multifusion.run(args, cfg, out_dir, argv)
    if getattr(args, "decode", False):
        from . import decode

        return decode.run(args, cfg, out_dir, argv)
    if getattr(args, "accelerate", False):
        from . import accelerate

        return accelerate.run(args, cfg, out_dir, argv)
    import afkern
    from afkern.backends import resolve_backend

    fast = resolve_backend("auto", device)
    versions = env.library_versions()
    meta = dict(device=env.device_name(device), device_type=device.type, threads=torch.get_num_threads(),
                clock="cuda-events" if device.type == "cuda" else args.clock,
                dtype=str(cfg["dtype"]).replace("torch.", ""), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **versions)
    csv_path = os.path.join(out_dir, "bench.csv")
    progress = Progress(sweep_cost(cfg), enabled=not args.no_progress)
    progress.log(f"afkern-bench {afkern.__version__} on {meta['device']} ({device.type}), {meta['dtype']}, "
                 f"{meta['threads']} torch threads; families {cfg['families']}; providers {cfg['providers']}; "
                 f"afkern auto -> {fast!r}; results -> {out_dir}")
    progress.log("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in versions.items()))
    t0 = time.perf_counter()
    try:
        rows = run_sweep(cfg, meta, progress, checkpoint=lambda rs: write_csv(csv_path, rs))
    finally:
        progress.close()
    fits, mslopes = linear_fits(rows), model_slopes(rows)
    targets = target_lines(rows, fits, device, fast)
    print()
    print(format_summary(rows, fits, mslopes, targets))
    write_csv(csv_path, rows)
    written = [csv_path]
    if not args.no_plots:
        title = f"{meta['device']}, {meta['dtype']}, {meta['threads']} threads, torch {meta['torch']}"
        written += write_plots(out_dir, rows, fits, title)
    write_markdown(os.path.join(out_dir, "results.md"), rows, fits, mslopes, targets, meta, argv)
    written.append(os.path.join(out_dir, "results.md"))
    print(f"\nwrote {', '.join(written)} in {time.perf_counter() - t0:.0f}s")
    return 0
