"""Command-line pieces the benchmark cases share (``afkern-bench --decode`` / ``--accelerate`` /
``--multifusion``): each case is an option group opened by its own flag, and list options are
comma-separated positive integers."""

from __future__ import annotations

from typing import List

__all__ = ["case_group", "positive_ints"]


def case_group(p, title: str, flag: str, help: str):
    """The option group of one case, with its ``store_true`` flag that runs the case instead of
    the sweep (``help`` says what it measures); returns the group for the case's own options."""
    g = p.add_argument_group(f"{title} ({flag})")
    g.add_argument(flag, action="store_true", help=f"run the {flag[2:]} benchmark instead of the sweep: {help}")
    return g


def positive_ints(s: str, option: str) -> List[int]:
    """The sorted distinct positive integers of a comma-separated option; SystemExit naming it."""
    try:
        vals = sorted({int(v) for v in s.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"afkern-bench: {option} expects comma-separated integers, got {s!r}") from None
    if not vals or vals[0] < 1:
        raise SystemExit(f"afkern-bench: {option} must be positive integers, got {s!r}")
    return vals
