"""scripts/distill.py's processes: one a GPU under torchrun (data-parallel), or one alone. Holds this process's rank,
logging (rank 0 only), the gradient all-reduce, rank 0's clock on every rank and the end-of-training check that the
ranks agree."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as tdist

RANK = 0  # this process's rank under torchrun; only rank 0 logs and writes


def log(*a) -> None:
    if RANK == 0:
        print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# --------------------------------------------------------------------------------------------- data parallel
def init_ranks() -> tuple[int, int, torch.device]:
    """(rank, world size, device): one process a GPU under torchrun (NCCL; gloo on the CPU), else (0, 1, ...)."""
    global RANK
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    RANK = tdist.get_rank()
    return RANK, world, device


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Replace each parameter's gradient by its mean over the ranks (one all-reduce of the flattened gradients).
    Parameters without a gradient (the same ones on every rank: one graph) are left without."""
    if world == 1:
        return
    have = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in have])
    tdist.all_reduce(flat)
    flat /= world
    off = 0
    for p in have:
        p.grad.copy_(flat[off : off + p.numel()].view_as(p.grad))
        off += p.numel()


def from_rank0(values: list[float], device, world: int) -> list[float]:
    """Rank 0's values on every rank: the clock that decides the stop and the learning rate must be one clock."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.broadcast(t, 0)
    return t.tolist()


def check_ranks_agree(params: list[torch.Tensor], device, world: int) -> None:
    """Every rank must end with the same parameters (same start, same averaged gradients, same learning rate)."""
    if world == 1:
        return
    mine = torch.stack([p.detach().double().sum() for p in params]).to(device)
    every = [torch.empty_like(mine) for _ in range(world)]
    tdist.all_gather(every, mine)
    if any(not torch.equal(every[0], x) for x in every[1:]):
        raise SystemExit("data-parallel training went out of step: the ranks' parameters differ")
    log(f"{world} ranks hold identical parameters")
