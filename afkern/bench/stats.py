"""Statistics of the timings: percentiles, paired ratios and a least-squares line with a verdict
on whether it is determined well enough to quote.

Line: ``y = intercept + slope * x`` by least squares over n points, with

    R^2      = 1 - SS_res / SS_tot
    se(slope) = sqrt(SS_res / (n - 2) / sum (x - mean x)^2)       (n >= 3)

A fit is *reliable* only if it has at least 3 points (with 2 the line always passes through
both and nothing says how well it is determined), a positive slope (the cost of an added adapter
cannot be negative: a negative slope means the timings are dominated by something else, such as
a group that ran before the machine was warm), ``R^2 >= MIN_R2`` and ``se(slope) <= MAX_REL_SE *
slope`` (the slope at least 4 standard errors from zero). An unreliable fit is reported with the
reason, never judged against a target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["percentile", "paired_ratio", "sample_columns", "LineFit", "fit_line", "MIN_R2", "MAX_REL_SE"]

MIN_R2 = 0.9
MAX_REL_SE = 0.25


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation; nan for no data."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[k] / den[k]``: both samples of a pair come from the same
    round-robin round, so a slow spell of the machine affects both and cancels."""
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    return percentile(pairs, 0.5) if pairs else float("nan")


@dataclass
class LineFit:
    slope: float
    intercept: float
    r2: float
    slope_se: float  # nan with fewer than 3 points
    points: int

    @property
    def unreliable_reason(self) -> str:
        """Why the fit cannot be quoted (module doc), or ``""`` if it can."""
        if self.points < 3:
            return f"{self.points} points"
        if not self.slope > 0:
            return f"slope {self.slope:.3g} <= 0"
        if not self.r2 >= MIN_R2:
            return f"R^2 {self.r2:.2f} < {MIN_R2}"
        if not self.slope_se <= MAX_REL_SE * self.slope:
            return f"slope +- {self.slope_se / self.slope:.0%}"
        return ""

    @property
    def reliable(self) -> bool:
        return not self.unreliable_reason


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LineFit:
    """Least-squares line through ``(xs, ys)`` (at least 2 distinct x) with R^2 and se(slope)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        raise ValueError("a line needs at least two distinct x values")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    se = math.sqrt(ss_res / (n - 2) / sxx) if n > 2 else float("nan")
    return LineFit(slope, intercept, r2, se, n)


def sample_columns(case) -> dict:
    """The timing columns of one provider's row (``median_ms``, ``p20_ms``, ``p80_ms``,
    ``repeats``, ``inner``) from its timed ``Case`` (NaN and 0 for a provider that did not run)."""
    s = case.samples if case is not None else []
    nan = float("nan")
    return dict(median_ms=percentile(s, 0.5) if s else nan, p20_ms=percentile(s, 0.2) if s else nan,
                p80_ms=percentile(s, 0.8) if s else nan, repeats=len(s), inner=case.inner if case is not None else 0)
