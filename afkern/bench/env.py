"""The machine a run measures: its name, the folder its results go to, library versions, load.

Results of different machines are not comparable, so each machine gets its own folder,
``<output-dir>/<device-slug>/``: the slug names the CPU model (``/proc/cpuinfo``'s "model name",
e.g. "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz" -> ``intel-xeon-platinum-8375c``) or the GPU
(e.g. "NVIDIA H100 80GB HBM3" -> ``nvidia-h100-80gb-hbm3``). A folder whose ``bench.csv`` was
written on another device is never overwritten: :func:`results_dir` refuses it before anything is
run (a rerun on the same machine replaces that machine's results).
"""

from __future__ import annotations

import csv
import os
import platform
import re
from typing import Dict

import torch

__all__ = ["cpu_model", "device_name", "slugify", "device_slug", "results_dir", "library_versions", "load1"]

RESULTS_CSV = "bench.csv"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slugify(name: str) -> str:
    """A folder name for a device name: lower case, trademarks, "CPU", "Processor", "N-Core"
    and the clock dropped, other runs of punctuation as one ``-``."""
    s = re.sub(r"\((r|tm|c)\)", " ", name.lower())
    s = re.sub(r"@.*$", " ", s)
    s = re.sub(r"\b(cpu|processor|\d+-core)\b", " ", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")


def device_slug(device: torch.device) -> str:
    return slugify(device_name(device)) or device.type


def results_dir(output_dir: str, device: torch.device) -> str:
    """``<output_dir>/<device-slug>/``; ``SystemExit`` if it holds another device's results."""
    path = os.path.join(output_dir, device_slug(device))
    mine = device_name(device)
    csv_path = os.path.join(path, RESULTS_CSV)
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as f:
            theirs = {r.get("device", "") for r in csv.DictReader(f)} - {""}
        if theirs and theirs != {mine}:
            raise SystemExit(f"afkern-bench: {path} holds results of {', '.join(sorted(theirs))}, not of this "
                             f"machine ({mine}); refusing to overwrite them. Choose another --output-dir.")
    return path


def library_versions() -> Dict[str, str]:
    from importlib import metadata

    import afkern

    out = {"torch": torch.__version__, "afkern": afkern.__version__, "python": platform.python_version()}
    for pkg in ("transformers", "adapters", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = ""
    return out


def load1() -> float:
    """The 1-minute load average: other work on the machine shows up in the timings."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return float("nan")
