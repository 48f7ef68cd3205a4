"""Data-parallel plumbing for ``torchrun`` (DDP; gloo on CPU, NCCL on GPU), picked up from the
environment; every helper is a no-op in a single process."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import TrainError

__all__ = ["Dist", "init_dist", "all_reduce_sum", "any_rank", "barrier", "shard", "params_in_sync", "log"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_dist(device_opt: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_opt == "auto":
        device_opt = "cuda" if torch.cuda.is_available() else "cpu"
    if device_opt.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but torch sees no CUDA device")
    if world > 1:
        import torch.distributed as dist

        if device_opt.startswith("cuda"):
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Dist(rank, world, local, device)
    return Dist(0, 1, 0, torch.device(device_opt))


def all_reduce_sum(values: List[float], d: Dist) -> List[float]:
    if not d.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank if it is True on any (so all ranks stop at the same step)."""
    return all_reduce_sum([1.0 if flag else 0.0], d)[0] > 0 if d.enabled else flag


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def shard(indices: Sequence[int], d: Dist) -> Tuple[List[int], List[bool]]:
    """Rank's share, padded (as DistributedSampler) so every rank runs the same number of steps;
    the flags mark real (not padding) positions."""
    indices = list(indices)
    n = len(indices)
    total = math.ceil(n / d.world) * d.world
    padded = indices + indices[: total - n]
    real = [True] * n + [False] * (total - n)
    return padded[d.rank::d.world], real[d.rank::d.world]


def params_in_sync(model: nn.Module, d: Dist) -> bool:
    """Whether every rank holds bit-identical trainable parameters."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().double().flatten() for p in model.parameters() if p.requires_grad]).to(d.device)
    gathered = [torch.empty_like(flat) for _ in range(d.world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def log(d: Dist, msg: str) -> None:
    """Print on the main process only."""
    if d.main:
        print(msg, flush=True)
