"""Atomic file writes: every checkpoint, result and figure afkern writes goes through here, so an
interrupted run never leaves a half-written file where a good one was (tmp file + fsync +
os.replace in the same folder)."""

from __future__ import annotations

import json
import os
import tempfile

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_save_png", "read_json"]


def atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj, **kwargs) -> None:
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("sort_keys", True)
    atomic_write_bytes(path, (json.dumps(obj, **kwargs) + "\n").encode())


def atomic_save_png(fig, path: str, dpi: int = 120) -> str:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_json(path: str, expected: str) -> dict:
    """A JSON file's content; a missing file or invalid JSON raises naming ``expected`` (what kind of
    directory should have held it)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found; expected {expected}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
