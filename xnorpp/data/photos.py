"""Photo-like JPEG trees for benchmarks and tests of the input pipelines (no download, any size).

A "photo" is a smooth random colour field (noise upsampled from several octaves, channels mixed), a few
sharp-edged blobs and fine texture, saved as a baseline 4:2:0 JPEG: at the default 500 x 375 and
quality 90 about 90 KB, as ImageNet's photos (~110 KB at ~400 x 350 on average). Decoding them costs
what decoding real photos of that size and compression costs, which random noise (far larger files) and
flat colours (far smaller) do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["make_photo", "make_photo_tree"]

_OCTAVES = ((4, 80.0), (16, 40.0), (64, 18.0), (200, 24.0), (500, 24.0))  # (cells across, amplitude)


def make_photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """A photo-like ``uint8`` ``height x width x 3`` image."""
    out = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in _OCTAVES:
        cells = min(cells, width)
        grid = rng.standard_normal((1, 3, max(2, height * cells // width), cells)).astype(np.float32)
        up = F.interpolate(torch.from_numpy(grid), size=(height, width), mode="bicubic", align_corners=False)
        out += amplitude * up[0].permute(1, 2, 0).numpy()
    mix = rng.uniform(0.3, 1.0, (3, 3)).astype(np.float32)
    out = out @ (mix / mix.sum(0, keepdims=True)) + rng.uniform(60, 190, 3).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(3, 8))):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.04, 0.3) * width
        blob = (xx - cx) ** 2 / rng.uniform(0.5, 2.0) + (yy - cy) ** 2 < r * r
        out[blob] = 0.5 * out[blob] + 0.5 * rng.uniform(0, 255, 3).astype(np.float32)
    out += rng.normal(0.0, 12.0, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_photo_tree(
    root: str | Path,
    n: int,
    classes: int = 4,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    val: int = 0,
    seed: int = 0,
) -> Path:
    """``root/train/c<k>/<i>.JPEG`` with ``n`` photos of ``size = (width, height)`` over ``classes``
    folders, and ``val`` per class in ``root/val/c<k>`` (the ImageNet layout); returns ``root``. Files
    that exist are kept (the same ``seed`` makes the same tree)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    jobs = [("train", i % classes, i // classes) for i in range(n)]
    jobs += [("val", k, i) for k in range(classes) for i in range(val)]
    for split, k, i in jobs:
        photo = make_photo(rng, *size)
        path = root / split / f"c{k}" / f"{i}.JPEG"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo).save(path, "JPEG", quality=quality)
    return root
