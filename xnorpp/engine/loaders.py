"""DataLoaders whose order and augmentation depend only on (seed, epoch, index): exact resume, any workers.

The training order is a :class:`torch.utils.data.DistributedSampler` permutation (also used with one
process), so ``set_epoch`` fixes it; resuming mid-epoch skips the batches already seen. Each sample's
augmentation runs under python/torch RNGs seeded from ``(seed, epoch, index)``, so it does not depend
on which worker loads it or on what ran before.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

__all__ = ["SeededDataset", "SkipSampler", "build_loaders", "worker_context"]


class SeededDataset(Dataset):
    """Wraps a dataset so that sample ``i`` in epoch ``e`` is augmented with RNGs seeded by ``(seed, e, i)``."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Any:
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 2_000_000_011 + int(index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues a seed for every lazy device module,
            # capturing a stack trace each time (0.5 ms a sample)
            torch.default_generator.manual_seed(sample_seed % (2**63))
            random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


class SkipSampler(Sampler[int]):
    """A sampler that drops its first ``skip`` indices (resuming mid-epoch), then resets to 0."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip_samples

    def __iter__(self) -> Iterator[int]:
        it = itertools.islice(iter(self.sampler), self.skip, None)
        self.skip = 0
        return it

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


def worker_context(num_workers: int) -> Any:
    """The multiprocessing context for DataLoader workers: the platform's own, also where another library
    changed the default (joblib's loky workers, i.e. ``hydra/launcher=local_parallel``, make it ``loky``,
    whose process class DataLoader cannot start: "'Process' object has no attribute 'env'")."""
    method = multiprocessing.get_start_method(allow_none=True)
    if num_workers == 0 or method in (None, "fork", "spawn", "forkserver"):
        return None
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def build_loaders(
    train_ds: Dataset,
    val_ds: Dataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    drop_last: bool = True,
    eval_batch_size: int | None = None,
) -> tuple[DataLoader, DataLoader, SkipSampler]:
    """Train and val loaders for one rank; ``batch_size`` is per process.

    Validation is split over ranks without padding (rank ``r`` takes samples ``r, r + world, ...``), so
    summed counts over ranks give exact metrics.
    """
    seeded = SeededDataset(train_ds, seed)
    dist_sampler = DistributedSampler(seeded, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler = SkipSampler(dist_sampler)
    persistent = num_workers > 0
    context = worker_context(num_workers)
    train = DataLoader(
        seeded, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        drop_last=drop_last, persistent_workers=False, multiprocessing_context=context,
    )  # fmt: skip
    val_part = val_ds if world_size == 1 else Subset(val_ds, range(rank, len(val_ds), world_size))  # type: ignore[arg-type]
    val = DataLoader(
        val_part, batch_size=eval_batch_size or batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=persistent, multiprocessing_context=context,
    )  # fmt: skip
    return train, val, sampler
