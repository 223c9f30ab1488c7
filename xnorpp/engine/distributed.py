"""DistributedDataParallel set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), and the
decisions every rank must make alike (:func:`ranks_with`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "PeerFailedError",
    "all_reduce_sum",
    "barrier",
    "collective_errors",
    "init_distributed",
    "is_primary",
    "peer_failed",
    "ranks_with",
    "world_size",
]


class PeerFailedError(RuntimeError):
    """A collective failed on this rank: another rank stopped (an error, a kill) or the network broke."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    ``device``: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. The backend is
    NCCL on CUDA and gloo on CPU unless given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(rank, world, local)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.device={device} but CUDA is not available here; use trainer.device=cpu or auto"
        )
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return info, dev


def world_size() -> int:
    """Processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_primary() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (identity when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def ranks_with(flags: list[bool], device: torch.device) -> list[int]:
    """For each flag, on how many ranks it is set (one all-reduce of ``len(flags)`` numbers; 0 or 1 when
    not distributed). Every rank calls it at the same point with as many flags, so all decide alike."""
    t = torch.tensor([float(f) for f in flags], device=device)
    return [int(v) for v in all_reduce_sum(t).tolist()]


def peer_failed(rank: int, error: Exception) -> PeerFailedError:
    """The error to raise on ``rank`` when a collective failed, naming the likely cause."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return PeerFailedError(
        f"rank {rank}: a collective operation failed ({first}): another rank most likely stopped with an "
        "error or was killed (its log says why); this rank stops too"
    )


@contextlib.contextmanager
def collective_errors(info: DistInfo) -> Iterator[None]:
    """Under DDP, turn the error of a failed collective (gloo reports a rank that has gone as a
    ``RuntimeError``) into a :class:`PeerFailedError` that says what most likely happened."""
    try:
        yield
    except RuntimeError as e:
        if info.enabled and (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise peer_failed(info.rank, e) from e
        raise


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
