"""How a group of cases is timed, and the peak memory of a call.

A *group* is every provider of one (family, kind, mode, N, tokens) point; its cases are timed
together so that their ratios compare calls made under the same machine conditions.

1. Warm-up, every case of every group, before any sample of the group is taken: the cases run
   round-robin, each until it has made at least ``warmup`` calls *and* spent at least
   ``warmup_ms`` in the calls after its first (which may carry one-off work: compilation, lazy
   initialisation) *and* stopped getting faster (its last two calls not more than 10% faster
   than the two before); after ``warmup`` calls, at most ``MAX_WARMUP_FACTOR * warmup_ms`` or
   ``MAX_WARMUP_CALLS`` calls. A count alone is not enough: a fresh process (or a machine coming
   out of idle) runs its first calls slowly for far longer than one call -- a plain block
   measured 19.1 ms in the first group and 8.7 ms in later ones when the first group had one
   warm-up call.
2. ``inner``: a sample runs the call ``inner`` times back to back and records the mean, with
   ``inner`` chosen from the median of the last three warm-up calls so that a sample lasts at
   least ``min_sample_ms``.
3. ``repeats`` samples of every case, round-robin, the starting case rotating each round (ratios
   are medians over rounds of the per-round ratio: a slow spell of a shared machine hits both
   sides of a ratio).
4. Peak memory: one more call per case (below).

Clocks. CPU: ``time.perf_counter`` (``clock="process"``: ``time.process_time``, the CPU time of
this process's threads, which other processes on a shared machine do not inflate; use it with one
torch thread, since idle OpenMP threads spin). CUDA: CUDA events around the sample.

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the
call. CPU: the peak of the CPU allocator's "Total Allocated" counter recorded by
``torch.profiler`` (``profile_memory=True``) during the call, counted from its value just before
the call: the peak of the tensor memory the call allocates on top of what already existed
(weights, inputs and, in ``backward`` mode, the retained graph are not counted). The process RSS
is not used: ``ru_maxrss`` only ever grows, so it cannot attribute a peak to a call.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .stats import percentile

__all__ = ["Case", "run_group", "run_cases", "warm_up", "time_once", "peak_memory_mb", "default_warmup_ms",
           "MAX_WARMUP_CALLS", "MAX_WARMUP_FACTOR"]

MAX_WARMUP_CALLS = 1000
MAX_WARMUP_FACTOR = 10
WARMING = 0.9  # a case still warms up while its last calls are faster than this fraction of the ones before


def default_warmup_ms(device: torch.device) -> float:
    return 100.0 if device.type == "cuda" else 250.0


@contextlib.contextmanager
def _quiet_fd2():
    """Silence C-level stderr (kineto prints a line at every profiler start and stop)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(call: Callable[[], object], inner: int, device: torch.device, clock: str = "wall") -> float:
    """Mean milliseconds of one call over ``inner`` back-to-back calls (clocks: module doc)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    timer = time.process_time if clock == "process" else time.perf_counter
    t0 = timer()
    for _ in range(inner):
        call()
    return (timer() - t0) * 1e3 / inner


def peak_memory_mb(call: Callable[[], object], device: torch.device) -> float:
    """Peak of the memory ``call`` allocates beyond what already exists, in MiB (module doc)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        with _quiet_fd2():
            prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
                 key=lambda e: (e.get("ts", 0), e["args"].get("Ev Idx", 0)))
    if not mem:
        return 0.0
    # "Total Allocated" is the profiler's running count, not reset between sessions: measure from
    # its value just before this session's first event.
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in mem) - base) / 2**20


@dataclass
class Case:
    """One provider in one group: ``prepare()`` (untimed) returns the callable to time."""

    provider: str
    prepare: Callable[[], Callable[[], object]]
    samples: List[float] = field(default_factory=list)
    inner: int = 1
    peak_mb: float = float("nan")
    warmup_ms: List[float] = field(default_factory=list)  # the times of its warm-up calls


def _warm(ts: List[float], min_calls: int, min_ms: float) -> bool:
    if len(ts) < min_calls:
        return False
    spent = sum(ts[1:])  # the first call may carry one-off work (compilation, lazy initialisation)
    if len(ts) >= MAX_WARMUP_CALLS or spent >= MAX_WARMUP_FACTOR * min_ms:
        return True
    if spent < min_ms:
        return False
    still_faster = len(ts) >= 4 and percentile(ts[-2:], 0.5) < WARMING * percentile(ts[-4:-2], 0.5)
    return not still_faster


def warm_up(calls: Dict[str, Callable[[], object]], warmup: int, warmup_ms: float, device: torch.device,
            clock: str = "wall") -> Dict[str, List[float]]:
    """Round-robin warm-up of every call (step 1 of the module doc); the times of each one's calls."""
    times: Dict[str, List[float]] = {k: [] for k in calls}
    pending = list(calls)
    while pending:
        for k in pending:
            _sync(device)
            times[k].append(time_once(calls[k], 1, device, clock))
        pending = [k for k in pending if not _warm(times[k], max(warmup, 1), warmup_ms)]
    return times


def run_group(cases: List[Case], repeats: int, warmup: int, min_sample_ms: float, device: torch.device,
              clock: str = "wall", warmup_ms: Optional[float] = None,
              tick: Optional[Callable[[float], None]] = None) -> None:
    """Time a group (module doc): warm up every case, pick each one's ``inner``, take ``repeats``
    samples round-robin, measure peak memory. ``tick(fraction)`` reports progress (fractions of the
    group, summing to 1)."""
    tick = tick or (lambda f: None)
    warmup_ms = default_warmup_ms(device) if warmup_ms is None else warmup_ms
    calls = {c.provider: c.prepare() for c in cases}
    times = warm_up(calls, warmup, warmup_ms, device, clock)
    for c in cases:
        c.warmup_ms = times[c.provider]
        t = percentile(c.warmup_ms[-3:], 0.5)
        c.inner = max(1, min(1000, math.ceil(min_sample_ms / max(t, 1e-6)))) if t < min_sample_ms else 1
    tick(0.2)
    for rep in range(repeats):
        k = rep % len(cases)
        for c in cases[k:] + cases[:k]:
            c.samples.append(time_once(calls[c.provider], c.inner, device, clock))
        tick(0.7 / repeats)
    for c in cases:
        c.peak_mb = peak_memory_mb(c.prepare(), device)
    tick(0.1)


def run_cases(cases: List[Case], cfg: dict, device: torch.device,
              tick: Optional[Callable[[float], None]] = None) -> Dict[str, Case]:
    """:func:`run_group` with the run's timing settings (``cfg``'s ``repeats``, ``warmup``,
    ``min_sample_ms``, ``clock``, ``warmup_ms``, from the command line); the timed cases by provider."""
    run_group(cases, cfg["repeats"], cfg["warmup"], cfg["min_sample_ms"], device, cfg["clock"], cfg["warmup_ms"],
              tick=tick)
    return {c.provider: c for c in cases}
