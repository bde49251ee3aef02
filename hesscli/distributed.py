"""torch.distributed helpers for ``torchrun -m hesscli ...``; no-ops in a single process.

Each rank holds a disjoint shard of the dataset; curvature products and loss sums are
all-reduced (SUM) so every rank sees exactly the full-dataset mean (each batch is weighted by
``n_b / N_total``). Probes come from the same seeded generator on every rank, so the
algorithms' state stays identical across ranks. Only rank 0 writes tables and prints.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks (in place, returned); identity in a single process."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t



def current() -> DistContext:
    """The context of an initialised process group, else a single process (never joins one)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def context(device: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL on CUDA (one device per local rank), gloo on CPU. Returns a single-process context
    when ``WORLD_SIZE`` is unset or 1.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistContext()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    atexit.register(_shutdown)
    return DistContext(dist.get_rank(), dist.get_world_size(), local)


def device_for(ctx: DistContext, spec: str) -> str:
    """``auto``/``cuda`` under torchrun with CUDA means this rank's own GPU."""
    if ctx.active and torch.cuda.is_available() and spec in ("auto", "cuda"):
        return f"cuda:{ctx.local_rank}"
    return spec


def _shutdown() -> None:
    """Leave the process group cleanly at exit (an abandoned gloo/NCCL group can abort the process)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
