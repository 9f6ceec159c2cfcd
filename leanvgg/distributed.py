"""torchrun support: which rank this is, and who does what (gloo on CPU, nccl on GPU).

leanvgg writes no scheduler: ``torchrun --nnodes N --nproc-per-node M -m leanvgg …`` starts the
processes, and these helpers let one code path run in one process or in many.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def distributed_context() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world_size) if world_size > 1 else (0, 1)


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Under torchrun, rank 0 runs the block first while the others wait, then they run it
    (building a cache entry once; the others find it made). A no-op in a single process."""
    rank, world_size = distributed_context()
    if world_size > 1 and rank != 0:
        dist.barrier()
    yield
    if world_size > 1 and rank == 0:
        dist.barrier()


def from_rank_zero(compute: Callable[[], T]) -> T:
    """``compute()`` run by rank 0 alone, its result sent to every rank (the others wait).

    For what must be one decision or one measurement: latency timed on rank 0's machine (the
    deployment target) with the other ranks idle, a clock-based budget, a report read once.
    """
    rank, world_size = distributed_context()
    value = compute() if rank == 0 else None
    if world_size > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if distributed_context()[1] > 1:
        dist.barrier()
