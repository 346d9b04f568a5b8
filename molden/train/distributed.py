"""One process or many under `torchrun`: the same code path.

A run is distributed when torchrun's environment says so (WORLD_SIZE > 1); molden never
spawns processes itself, so a command launched by torchrun cannot be launched twice (the
double launch of MACE #458). gloo on CPU, nccl on CUDA; `MOLDEN_DIST_BACKEND=gloo` picks gloo
on CUDA too, for more ranks than GPUs (nccl refuses two ranks on one GPU) or a broken nccl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from molden.errors import MoldenConfigError


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise MoldenConfigError("--device cuda but torch sees no CUDA device (a CPU build of torch, or no GPU)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device_choice: str) -> Distributed:
    """This process's rank and device; joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(_backend(device))
    return Distributed(rank=rank, world_size=world, local_rank=local, device=device)


BACKENDS = ("gloo", "nccl")


def _backend(device: torch.device) -> str:
    chosen = os.environ.get("MOLDEN_DIST_BACKEND", "").strip().lower()
    if not chosen:
        return "nccl" if device.type == "cuda" else "gloo"
    if chosen not in BACKENDS:
        raise MoldenConfigError(f"MOLDEN_DIST_BACKEND={chosen}: not one of {', '.join(BACKENDS)}")
    if chosen == "nccl" and device.type != "cuda":
        raise MoldenConfigError("MOLDEN_DIST_BACKEND=nccl needs --device cuda")
    return chosen


def teardown(d: Distributed) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, d: Distributed) -> torch.Tensor:
    """Sum over processes (a no-op for one process)."""
    if d.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor, d: Distributed) -> torch.Tensor:
    if d.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def barrier(d: Distributed) -> None:
    if d.active:
        dist.barrier()


def any_rank(d: Distributed, *flags: bool) -> tuple[bool, ...]:
    """Each flag, True when it is True on any process (a stop request seen by one rank stops
    all), in one all-reduce: one device wait per step, whatever the number of flags."""
    if not d.active:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())