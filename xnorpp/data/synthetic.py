"""``synthetic``: a tiny, learnable, fully deterministic image classification problem (smoke tests).

Each class has a fixed random prototype (a smooth pattern: Gaussian noise at 1/4 resolution, bilinearly
upsampled and scaled to unit variance); each sample is ``prototype + noise * N(0, 1)``, rescaled to unit
variance. Everything comes from one ``torch.Generator`` seeded with ``seed`` (prototypes first, then
train, then val), so the same arguments always give the same tensors, independently of torch's global
RNG. Classes are balanced (labels cycle through the classes, then are shuffled).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import build_transforms
from .base import DatasetInfo, InMemoryImageDataset

__all__ = ["build_synthetic", "make_prototypes"]


def make_prototypes(num_classes: int, in_chans: int, image_size: int, generator: torch.Generator) -> Tensor:
    """``num_classes x in_chans x S x S`` smooth random patterns, each with zero mean and unit std."""
    low = max(2, math.ceil(image_size / 4))
    coarse = torch.randn(num_classes, in_chans, low, low, generator=generator)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    protos = protos - protos.mean(dim=(1, 2, 3), keepdim=True)
    return protos / protos.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def _samples(protos: Tensor, n: int, noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    k = protos.shape[0]
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=generator)]
    eps = torch.randn((n, *protos.shape[1:]), generator=generator)
    images = (protos[labels] + noise * eps) / math.sqrt(1.0 + noise**2)
    return images, labels


def build_synthetic(
    *,
    image_size: int = 32,
    num_samples: int = 512,
    num_val: int | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    split_seed: int = 0,
    noise: float = 1.0,
    augment: str | bool = False,
    hflip: bool = True,
    **policy_options: object,
) -> tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]:
    """Build the synthetic train/val datasets.

    Args:
        image_size: side length of the square images.
        num_samples: number of train images.
        num_val: number of val images; default ``max(num_samples // 4, 2 * num_classes)``.
        num_classes: default 10.
        in_chans: default 3.
        split_seed: seed of the ``torch.Generator`` that produces prototypes and samples.
        noise: per-pixel noise std relative to the (unit-std) prototypes.
        augment: train augmentation policy (default ``none``: the samples are already noisy); ``True``
            means ``small``.
        hflip: horizontal flips in policies that flip.
    """
    num_classes = 10 if num_classes is None else int(num_classes)
    in_chans = 3 if in_chans is None else int(in_chans)
    if num_classes < 2 or in_chans < 1 or image_size < 1 or num_samples < 1 or noise < 0:
        raise ValueError(
            f"synthetic: need num_classes >= 2, in_chans >= 1, image_size >= 1, num_samples >= 1, "
            f"noise >= 0; got {num_classes=}, {in_chans=}, {image_size=}, {num_samples=}, {noise=}"
        )
    num_val = max(num_samples // 4, 2 * num_classes) if num_val is None else int(num_val)

    gen = torch.Generator().manual_seed(int(split_seed))
    protos = make_prototypes(num_classes, in_chans, image_size, gen)
    train_x, train_y = _samples(protos, num_samples, noise, gen)
    val_x, val_y = _samples(protos, num_val, noise, gen)

    classes = tuple(f"class_{i}" for i in range(num_classes))
    transform, _, policy = build_transforms(
        augment, dataset="synthetic", default="small", image_size=image_size, input="tensor",
        mean=(0.0,) * in_chans, std=(1.0,) * in_chans, hflip=hflip, **policy_options,
    )  # fmt: skip
    train_ds = InMemoryImageDataset(train_x, train_y, classes, transform)
    val_ds = InMemoryImageDataset(val_x, val_y, classes)
    info = DatasetInfo(
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=image_size,
        classes=classes,
        mean=(0.0,) * in_chans,
        std=(1.0,) * in_chans,
        augment=policy,
    )
    return train_ds, val_ds, info
