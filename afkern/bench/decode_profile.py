"""Where afkern's per-token decoding time goes (``afkern-bench --decode --decode-profile``).

One greedy ``generate()`` of afkern's model and one of the plain model (the same prompt, after a
warm-up call each), profiled twice:

* ``cProfile`` (Python): own time per function, and own time summed per source area (afkern's
  modules by file, torch's ``nn`` modules, transformers, the rest of torch, other), each in ms per
  generated token, afkern's beside the plain model's: the difference is what the adapters, the
  fusion and the code around them (hooks, dispatch, small ops) add per token;
* ``torch.profiler`` (ops): self CPU time and call count per aten op per token, afkern beside
  plain; the extra op calls per token are the small-op overhead.

Both profilers slow the calls down (cProfile most, in Python-heavy code): read the shares and the
differences, not the absolute times; the benchmark's timings are the un-profiled ones.
"""

from __future__ import annotations

import cProfile
import os
import pstats
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .._io import atomic_write_bytes

__all__ = ["profile_report", "python_profile", "op_profile"]

TOP = 25


def _area(filename: str) -> str:
    """The source area a function belongs to (module doc)."""
    f = filename.replace(os.sep, "/")
    if "/afkern/" in f:
        return "afkern/" + f.rsplit("/afkern/", 1)[1]
    if "/torch/nn/" in f:
        return "torch.nn (modules, functional)"
    if "/transformers/generation/" in f:
        return "transformers.generation"
    if "/transformers/" in f:
        return "transformers (models, cache, masks)"
    if "/torch/" in f:
        return "torch (other Python)"
    if f.startswith("~") or f.startswith("<"):
        return "builtins / C calls (torch ops included)"
    return "other Python"


def python_profile(call) -> pstats.Stats:
    """cProfile of one ``call()`` (after one warm-up call)."""
    call()
    prof = cProfile.Profile()
    prof.enable()
    call()
    prof.disable()
    return pstats.Stats(prof)


def _by_function(stats: pstats.Stats, per: float) -> Dict[Tuple[str, int, str], Tuple[int, float, float]]:
    """{(file, line, function): (calls per token, own ms per token, cumulative ms per token)}."""
    return {k: (v[1] / per, v[2] * 1e3 / per, v[3] * 1e3 / per) for k, v in stats.stats.items()}


def _by_area(funcs) -> Dict[str, float]:
    out: Dict[str, float] = defaultdict(float)
    for (f, _, _), (_, own, _) in funcs.items():
        out[_area(f)] += own
    return out


def op_profile(call, per: float) -> Dict[str, Tuple[float, float]]:
    """{aten op: (calls per token, self CPU ms per token)} of one ``call()`` (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    from .timing import _quiet_fd2

    call()
    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
    return {e.key: (e.count / per, e.self_cpu_time_total / 1e3 / per) for e in prof.key_averages()}


def _short(key: Tuple[str, int, str]) -> str:
    f, line, fn = key
    f = f.replace(os.sep, "/")
    for root in ("/afkern/", "/site-packages/"):
        if root in f:
            f = ("afkern/" if root == "/afkern/" else "") + f.rsplit(root, 1)[1]
            break
    return f"{fn} ({f}:{line})"


def profile_report(path: str, pm: nn.Module, fm: nn.Module, ids: torch.Tensor, new_tokens: int, generate) -> str:
    """Profile afkern's and the plain model's ``generate()`` on ``ids`` (module doc; ``generate``:
    ``afkern.bench.decode.generate``, passed in so that imports run one way); write the summary to
    ``path`` (atomically) and return ``path``."""
    per = float(new_tokens)  # per decoding step (each step makes one token for every row of the batch)
    calls = {"afkern": lambda: generate(fm, ids, new_tokens), "plain": lambda: generate(pm, ids, new_tokens)}
    py = {k: _by_function(python_profile(c), per) for k, c in calls.items()}
    ops = {k: op_profile(c, per) for k, c in calls.items()}
    layers = sum(1 for m in fm.modules() if type(m).__name__ == "FusedAdapterBlock")
    out: List[str] = [
        f"# afkern decode profile: greedy generate(), batch {ids.shape[0]}, prompt {ids.shape[1]}, {new_tokens} new "
        f"tokens, {layers} fused layers; per generated token (profiled: slower than the benchmark's timings)", ""]
    tot = {k: sum(v[1] for v in f.values()) for k, f in py.items()}
    out.append(f"cProfile own time, total: afkern {tot['afkern']:.2f} ms/token, plain {tot['plain']:.2f} ms/token, "
               f"difference {tot['afkern'] - tot['plain']:.2f} ms/token = {(tot['afkern'] - tot['plain']) / max(layers, 1):.3f} "
               "ms per layer per token")
    out += ["", "## Own time by source area (ms/token): afkern | plain | difference"]
    areas = {k: _by_area(f) for k, f in py.items()}
    for a in sorted(set(areas["afkern"]) | set(areas["plain"]),
                    key=lambda a: -(areas["afkern"].get(a, 0) - areas["plain"].get(a, 0))):
        fa, pa = areas["afkern"].get(a, 0.0), areas["plain"].get(a, 0.0)
        out.append(f"  {a:<55} {fa:8.3f} | {pa:8.3f} | {fa - pa:+8.3f}")
    out += ["", f"## afkern: top {TOP} functions by own time (calls/token, own ms/token, cumulative ms/token)"]
    for k, (n, own, cum) in sorted(py["afkern"].items(), key=lambda kv: -kv[1][1])[:TOP]:
        out.append(f"  {n:8.1f} {own:8.3f} {cum:8.3f}  {_short(k)}")
    out += ["", "## afkern's own functions by cumulative time (calls/token, own, cumulative ms/token)"]
    mine = [(k, v) for k, v in py["afkern"].items() if "/afkern/" in k[0].replace(os.sep, "/")]
    for k, (n, own, cum) in sorted(mine, key=lambda kv: -kv[1][2])[:TOP]:
        out.append(f"  {n:8.1f} {own:8.3f} {cum:8.3f}  {_short(k)}")
    calls_tot = {k: sum(v[0] for v in o.values()) for k, o in ops.items()}
    out += ["", f"## torch ops (torch.profiler): {calls_tot['afkern']:.0f} op calls/token for afkern, "
                f"{calls_tot['plain']:.0f} for plain ({calls_tot['afkern'] - calls_tot['plain']:+.0f}); top {TOP} by the "
                "difference in self CPU time (calls/token afkern, plain; self ms/token afkern, plain)"]
    keys = set(ops["afkern"]) | set(ops["plain"])
    diff = lambda k: ops["afkern"].get(k, (0, 0))[1] - ops["plain"].get(k, (0, 0))[1]  # noqa: E731
    for k in sorted(keys, key=lambda k: -diff(k))[:TOP]:
        (na, ta), (np_, tp) = ops["afkern"].get(k, (0, 0.0)), ops["plain"].get(k, (0, 0.0))
        out.append(f"  {na:7.1f} {np_:7.1f}  {ta:7.3f} {tp:7.3f}  {k}")
    atomic_write_bytes(path, ("\n".join(out) + "\n").encode())
    return path
