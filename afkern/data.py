"""Kept for imports written before the training code became the package :mod:`afkern.train`:
task data lives in :mod:`afkern.train.data`, the generated demo tasks in :mod:`afkern.train.demo_data`."""

from .train.data import *  # noqa: F401,F403
from .train.data import __all__ as _data_all
from .train.demo_data import *  # noqa: F401,F403
from .train.demo_data import __all__ as _demo_all

__all__ = list(_data_all) + list(_demo_all)
