"""The two errors ``afkern-train`` reports as a one-line message (exit status 2) instead of a traceback."""

from __future__ import annotations

__all__ = ["TrainError", "DataError"]


class TrainError(ValueError):
    """A setup problem found before training starts (model, adapters, options, output directory,
    missing extras), or a checkpoint that does not belong to this run."""


class DataError(ValueError):
    """Bad training data: missing file or column, empty file, unknown label; names file and line."""
