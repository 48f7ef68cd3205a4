"""The sweep: every (family, kind, N, tokens, mode) the run asks for, checked, timed, one row each.

For each family and kind (``block``, then ``model``) and each N: build the models
(:class:`~.models.Setup`) and every wanted provider's runner (plus ``reference``, which the
correctness guard needs); for each token count: the inputs (:mod:`.cases`), the float64 oracle and
the check of every provider (:mod:`.check`); for each mode: one timed group of the providers that
passed (:mod:`.timing`). A provider that cannot be built, raises or fails the check gets a row
with its status and no timings.

Per row: median / p20 / p80 of the samples; ``speedup_vs_adapters`` = the median over rounds of
``adapters sample / this sample`` (same round), ``ratio_to_plain`` = the median over rounds of
``this sample / plain sample``; the baselines' ``n`` is 0 (they do not depend on N, and are timed
in every group so that every ratio is taken under the same conditions).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

from .cases import GRAD_FREE_MODES, make_inputs, prepare_call
from .check import check_provider, make_oracle
from .env import load1
from .models import Setup
from .progress import Progress, group_cost
from .providers import BASELINES, PROVIDERS, ProviderUnavailable, Runner
from .stats import paired_ratio, percentile
from .timing import Case, run_cases

__all__ = ["run_sweep", "sweep_cost", "check_tokens"]


def check_tokens(tokens: int, seq_len: int, limit) -> int:
    """The token count the correctness guard runs on: all ``tokens``, or at most ``limit`` (whole
    sequences of ``seq_len`` where the case has several)."""
    if limit is None or tokens <= limit:
        return tokens
    return limit if limit < seq_len else (limit // seq_len) * seq_len

def _plan(cfg: dict, kind: str):
    """(N values, token counts, modes, layers, wanted providers) of one kind."""
    if kind == "block":
        plan = cfg["block_n"], cfg["block_tokens"], cfg["block_modes"], 1
    else:
        plan = cfg["model_n"], cfg["model_tokens"], cfg["model_modes"], cfg["layers"]
    wanted = [p for p in cfg["providers"] if kind in PROVIDERS[p].kinds]
    return plan + (wanted,)


def _check_cost(n: int, tokens: int, layers: int, wanted: List[str]) -> float:
    # every checked provider, the reference and the float64 oracle, forward and backward
    return group_cost(n, tokens, layers, "full", sum(PROVIDERS[p].checked for p in wanted) + 2)


def sweep_cost(cfg: dict) -> float:
    """The estimated work of the whole sweep, in :func:`~.progress.group_cost` units."""
    total = 0.0
    for _family in cfg["families"]:
        for kind in cfg["kinds"]:
            ns, token_list, modes, layers, wanted = _plan(cfg, kind)
            if not wanted:
                continue
            for n in ns:
                for tokens in token_list:
                    total += _check_cost(n, tokens, layers, wanted)
                    total += sum(group_cost(n, tokens, layers, m, len(wanted)) for m in modes)
    return total


def _build(setup: Setup, kind: str, names: List[str]) -> Tuple[Dict[str, Runner], Dict[str, str]]:
    runners: Dict[str, Runner] = {}
    status: Dict[str, str] = {}
    for name in names:
        try:
            runners[name] = PROVIDERS[name].build(setup, kind)
        except ProviderUnavailable as exc:
            status[name] = f"unavailable: {exc}"
        except Exception as exc:  # a provider that cannot even be built is reported, not fatal
            status[name] = f"error: {type(exc).__name__}: {exc}"
    return runners, status


def _first_line(exc: Exception) -> str:
    s = str(exc)
    return s.splitlines()[0] if s else ""


def run_sweep(cfg: dict, meta: dict, progress: Progress,
              checkpoint: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Run the sweep (module doc); ``checkpoint(rows)`` after every N keeps partial results."""
    rows: List[dict] = []
    device, dtype, shape, seq_len, seed = cfg["device"], cfg["dtype"], cfg["shape"], cfg["seq_len"], cfg["seed"]
    for family in cfg["families"]:
        for kind in cfg["kinds"]:
            ns, token_list, modes, layers, wanted = _plan(cfg, kind)
            if not wanted:
                continue
            grads = any(m not in GRAD_FREE_MODES for m in modes)
            tag = f"[{family} {kind}]"
            for n in ns:
                t0 = time.perf_counter()
                progress.status(f"{family} {kind} N={n}: building")
                setup = Setup(shape, n, layers, seq_len, device, dtype, seed=seed, family=family)
                runners, status = _build(setup, kind, list(dict.fromkeys(wanted + ["reference"])))
                if "reference" not in runners:
                    raise RuntimeError(f"the reference provider could not be built: {status.get('reference')}")
                progress.log(f"{tag} N={n}: built in {time.perf_counter() - t0:.1f}s")
                for tokens in token_list:
                    progress.status(f"{family} {kind} N={n} {tokens} tok: checking")
                    inputs, dy, (B, S) = make_inputs(setup, kind, tokens, seq_len, seed + tokens)
                    ct = check_tokens(tokens, seq_len, cfg.get("check_tokens"))
                    c_inputs, c_dy, _ = (inputs, dy, None) if ct == tokens else make_inputs(setup, kind, ct, seq_len,
                                                                                            seed + tokens)
                    oracle = make_oracle(setup, kind, c_inputs, c_dy, grads, runners["reference"])
                    st, errs = dict(status), {}
                    for name in wanted:
                        if name in st:
                            continue
                        if not PROVIDERS[name].checked:
                            st[name], errs[name] = "ok", float("nan")
                            continue
                        try:
                            st[name], errs[name] = check_provider(runners[name], oracle, c_inputs, c_dy, grads)
                        except Exception as exc:
                            st[name], errs[name] = f"error: {type(exc).__name__}: {_first_line(exc)}", float("nan")
                        if st[name] != "ok":
                            progress.log(f"{tag} N={n} tokens={tokens}: provider {name!r} not timed: {st[name]}")
                    progress.advance(_check_cost(n, tokens, layers, wanted))
                    for mode in modes:
                        work = group_cost(n, tokens, layers, mode, len(wanted))
                        cases = [Case(name, prepare_call(runners[name], inputs, dy, mode)) for name in wanted
                                 if st[name] == "ok"]
                        progress.status(f"{family} {kind} N={n} {tokens} tok {mode}: timing")
                        t1 = time.perf_counter()
                        if cases:
                            run_cases(cases, cfg, device, tick=lambda f, w=work: progress.advance(w * f))
                        else:
                            progress.advance(work)
                        progress.log(f"{tag} N={n} tokens={tokens} {mode}: {len(cases)} providers in "
                                     f"{time.perf_counter() - t1:.1f}s")
                        load = load1() if cases else float("nan")
                        rows += _group_rows(cases, wanted, st, errs, oracle.ref_worst, meta, load,
                                            dict(kind=kind, family=family, mode=mode, n=n, tokens=tokens, batch=B,
                                                 seq_len=S, layers=layers, hidden=shape.hidden,
                                                 intermediate=shape.intermediate, bottleneck=shape.bottleneck))
                del setup, runners
                if checkpoint is not None:
                    checkpoint(rows)
    return rows


def _group_rows(cases: List[Case], wanted: List[str], st: Dict[str, str], errs: Dict[str, float], ref_err: float,
                meta: dict, load: float, point: dict) -> List[dict]:
    """One row per wanted provider of a timed group (module doc)."""
    by = {c.provider: c for c in cases}
    a, p = by.get("adapters"), by.get("plain")
    group = []
    for name in wanted:
        row = dict(meta, **point, provider=name, status=st[name], rel_err=errs.get(name, float("nan")),
                   ref_rel_err=ref_err, load1=load)
        if name in BASELINES:
            row["n"] = 0
        c = by.get(name)
        if c is not None:
            row.update(median_ms=percentile(c.samples, 0.5), p20_ms=percentile(c.samples, 0.2),
                       p80_ms=percentile(c.samples, 0.8), repeats=len(c.samples), inner=c.inner, peak_mem_mb=c.peak_mb,
                       speedup_vs_adapters=paired_ratio(a.samples, c.samples)
                       if a is not None and name not in BASELINES else float("nan"),
                       ratio_to_plain=paired_ratio(c.samples, p.samples)
                       if p is not None and name != "plain_layer" else float("nan"))
        group.append(row)
    return group
