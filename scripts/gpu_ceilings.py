#!/usr/bin/env python3
"""The two ceilings of this device, measured the way the roofline report uses them
(stage ``ceilings`` of scripts/gpu_validate.sh; docs/GPU_RUNBOOK.md):

* copy bandwidth: ``dst.copy_(src)`` of a large device buffer (default 2 GiB), bytes read plus
  bytes written over the time;
* matmul rate: ``torch.matmul(a, b, out=c)`` at 8192 x 8192 x 8192 in bfloat16, float16 and float32
  (TF32 off, as afkern's float32 paths compute), 2 n^3 FLOPs over the time.

Inputs are random (never zeros: they run faster than real data). Each figure is the median of
``--iters`` timed calls after ``--warmup`` calls, each call timed with CUDA events (CPU: a host
clock). Writes ``<out-root>/<device-slug>/ceilings.json`` and prints a table last.

    python scripts/gpu_ceilings.py --out-root benchmarks/results/gpu-ceilings
    python scripts/gpu_ceilings.py --dry ...        CPU, tiny sizes (the dry run of the stage)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_tools import device_slug, table  # noqa: E402


def timed(fn, iters: int, warmup: int, device: torch.device):
    """(median, min, max) seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def copy_bandwidth(device, nbytes: int, iters: int, warmup: int) -> dict:
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    med, lo, hi = timed(lambda: dst.copy_(src), iters, warmup, device)
    assert torch.equal(dst[:1024], src[:1024]) and torch.equal(dst[-1024:], src[-1024:]), "copy did not copy"
    moved = 2 * n * src.element_size()
    return dict(bytes_moved=moved, median_s=med, min_s=lo, max_s=hi, gbps=moved / med / 1e9,
                gbps_best=moved / lo / 1e9)


def matmul_rate(device, n: int, dtype, iters: int, warmup: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    med, lo, hi = timed(lambda: torch.matmul(a, b, out=c), iters, warmup, device)
    if n <= 2048 or device.type == "cuda":  # a spot check that a product was computed
        k = min(n, 64)
        ref = a[:k].double() @ b[:, :k].double()
        err = ((c[:k, :k].double() - ref).norm() / ref.norm()).item()
        assert err < 5e-2, f"matmul {dtype} spot check: relative error {err:.2e}"
    flops = 2.0 * n ** 3
    return dict(n=n, median_s=med, min_s=lo, max_s=hi, tflops=flops / med / 1e12, tflops_best=flops / lo / 1e12)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-root", default="benchmarks/results/gpu-ceilings")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the copied buffer (GiB)")
    p.add_argument("--n", type=int, default=8192, help="matmul size n (n x n x n)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dry", action="store_true", help="tiny sizes (CPU dry run)")
    a = p.parse_args(argv)
    if a.dry:
        a.copy_gib, a.n, a.iters, a.warmup = 1 / 64, 256, 5, 1
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = device_slug(str(device))
    res = dict(device=name, slug=slug, torch=torch.__version__, cuda=torch.version.cuda,
               date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), method=__doc__.split("\n\n")[1])
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        res.update(sm_count=prop.multi_processor_count, memory_gib=round(prop.total_memory / 2 ** 30, 1),
                   capability=f"{prop.major}.{prop.minor}", l2_mib=round(getattr(prop, "L2_cache_size", 0) / 2 ** 20, 1))
    res["copy"] = copy_bandwidth(device, int(a.copy_gib * 2 ** 30), a.iters, a.warmup)
    res["matmul"] = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        res["matmul"][str(dt).replace("torch.", "")] = matmul_rate(device, a.n, dt, a.iters, a.warmup)
    res["copy_gbps"] = res["copy"]["gbps"]
    res["matmul_tflops"] = {k: v["tflops"] for k, v in res["matmul"].items()}
    res["summary"] = {"copy GB/s": round(res["copy_gbps"], 1),
                      **{f"{k} TFLOP/s": round(v, 1) for k, v in res["matmul_tflops"].items()}}
    folder = os.path.join(a.out_root, slug)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "ceilings.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    rows = [["copy (device to device, read + write)", f"{res['copy']['gbps']:.0f} GB/s",
             f"{res['copy']['gbps_best']:.0f} GB/s", f"{res['copy']['bytes_moved'] / 2 ** 30:.2f} GiB moved",
             f"{res['copy']['median_s'] * 1e3:.3f} ms"]]
    for k, v in res["matmul"].items():
        rows.append([f"matmul {k} {v['n']}^3" + (" (TF32 off)" if k == "float32" else ""), f"{v['tflops']:.1f} TFLOP/s",
                     f"{v['tflops_best']:.1f} TFLOP/s", f"{2 * v['n'] ** 3 / 1e12:.2f} TFLOP", f"{v['median_s'] * 1e3:.3f} ms"])
    print(f"ceilings of {name} ({slug}), torch {torch.__version__}, median of {a.iters} after {a.warmup} warm-up:")
    print(table(["ceiling", "median", "best", "work", "median time"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
