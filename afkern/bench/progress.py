"""Progress of a sweep on stderr: a tqdm bar with the elapsed time and an ETA.

Groups take very different times (N = 64 over 12 layers against N = 1 on one block), so the bar
counts estimated work, not groups. The estimate of a group (:func:`group_cost`) is

    providers * layers * tokens * (8 + N) * MODE_WEIGHT[mode]

(a call's time grows about linearly in the tokens and, for the N-wide providers, in N; a backward
costs about twice a forward); building the models of one N and checking every provider at one
token count count as one ``full`` group (the float64 oracle included). The bar advances inside a
group too (after the warm-up and after every round of samples), so even a group of several
minutes shows progress; the ETA is tqdm's: the estimated work left over the rate measured so far.
Log lines go to stdout through ``tqdm.write``, which keeps them from tearing the bar.
"""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm

__all__ = ["Progress", "group_cost", "MODE_WEIGHT"]

MODE_WEIGHT = {"forward": 1.0, "inference": 1.0, "backward": 2.0, "full": 3.0, "train_step": 3.0}
BAR_FORMAT = "afkern-bench {percentage:3.0f}%|{bar:24}| {elapsed} elapsed, ETA {remaining}{postfix}"


def group_cost(n: int, tokens: int, layers: int, mode: str, providers: int) -> float:
    """Estimated relative cost of a group (module doc)."""
    return float(max(providers, 1) * layers * tokens * (8 + n) * MODE_WEIGHT.get(mode, 3.0))


class Progress:
    """The bar (disabled: log lines only). ``advance(work)`` moves it by estimated work,
    ``status(text)`` says what runs now, ``log(line)`` prints a line above it."""

    def __init__(self, total: float, enabled: bool = True, file=None):
        self.enabled = enabled
        self.bar = tqdm(total=total, file=file or sys.stderr, disable=not enabled, bar_format=BAR_FORMAT,
                        mininterval=0.5, dynamic_ncols=True, smoothing=0.05)

    def advance(self, work: float) -> None:
        self.bar.update(work)

    def status(self, text: str) -> None:
        if self.enabled:
            self.bar.set_postfix_str(text, refresh=True)

    def log(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def close(self, status: Optional[str] = None) -> None:
        if status is not None:
            self.status(status)
        self.bar.close()
