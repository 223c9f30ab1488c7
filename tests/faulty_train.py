"""``train.py`` with a fault in the training data of one rank, for the DDP tests (``torchrun ... faulty_train.py``).

``FAULT_RANK`` (default 1) sees, after its first ``FAULT_AFTER`` training images, ``FAULT_COUNT``
(default: all the rest) images of NaN (``FAULT=nan``) or an unreadable image (``FAULT=error``, an
``OSError`` as from a lost file); the other ranks' data is untouched. Everything else is the real
``train.py`` run.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

import xnorpp.run

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


class Faulty(Dataset):
    """``dataset`` whose reads ``after + 1 .. after + count`` are bad (this process only, ``num_workers=0``)."""

    def __init__(self, dataset: Dataset, fault: str, after: int, count: int) -> None:
        self.dataset, self.fault, self.after, self.count, self.reads = dataset, fault, after, count, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        image, label = self.dataset[index]
        self.reads += 1
        if not self.after < self.reads <= self.after + self.count:
            return image, label
        if self.fault == "nan":
            return torch.full_like(image, float("nan")), label
        raise OSError(f"cannot read training image {index}: Input/output error (injected on this rank)")


def _build_datasets(*args: Any, **kwargs: Any) -> Any:
    train, val, info = _real_build_datasets(*args, **kwargs)
    if os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "1"):
        after, count = int(os.environ.get("FAULT_AFTER", "0")), int(os.environ.get("FAULT_COUNT", len(train)))
        train = Faulty(train, os.environ["FAULT"], after, count)
    return train, val, info


_real_build_datasets = xnorpp.run.build_datasets
xnorpp.run.build_datasets = _build_datasets

if __name__ == "__main__":
    sys.argv[0] = str(TRAIN_PY)
    runpy.run_path(str(TRAIN_PY), run_name="__main__")
