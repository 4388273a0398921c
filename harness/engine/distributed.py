"""torchrun support shared by training and evaluation: process-group set-up, rank helpers, exact reductions.

``torchrun --nproc-per-node N -m harness <command> ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`init_distributed` reads them and starts a process group (``nccl`` for CUDA devices,
``gloo`` otherwise). Without them everything runs as a single process (``world_size = 1``) and every helper here
is a no-op, so callers never branch on "distributed or not".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 4 * 3600

__all__ = ["DistInfo", "init_distributed", "shutdown", "barrier", "all_gather_objects", "broadcast_object"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: the torch device this process uses.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, checkpoints and result files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistInfo:
    """Start the process group when launched by torchrun; otherwise a single-process :class:`DistInfo`.

    Args:
        device: the requested device (``cpu``, ``cuda``, ``cuda:0``). Under torchrun with CUDA each process takes
            ``cuda:<LOCAL_RANK>``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        # Generous: rank 0 may spend minutes on work the others wait for (e.g. COCOeval of an eval-grid cell).
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group (no-op for a single process)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op for a single process)."""
    if info.distributed:
        dist.barrier()


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for a single process.

    Used to merge integer counts and float sums exactly: each rank's partial statistics travel whole and are
    added in rank order on every rank, so the result does not depend on a reduction tree's order.
    """
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
