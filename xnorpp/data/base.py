"""Shared pieces of the dataset package: :class:`DatasetInfo` and the in-memory tensor dataset.

Every dataset returns ``(image, label)`` with ``image`` a normalised ``float32`` tensor of shape
``C x H x W`` and ``label`` a python ``int``. Any augmentation randomness is drawn from torch's global
RNG inside ``__getitem__`` (never python's ``random`` or numpy), so seeding torch (per worker) makes a
run reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DatasetInfo", "InMemoryImageDataset", "RandomTranslate", "check_fraction"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset, used to build the model head/stem and to log the run.

    ``mean``/``std`` are the per-channel statistics the images were normalised with (already applied
    by the datasets; kept for de-normalising, e.g. to visualise samples). ``augment`` is the train
    augmentation policy in use (:mod:`xnorpp.data.augment`).
    """

    num_classes: int
    in_chans: int
    image_size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"

    def __post_init__(self) -> None:
        if self.num_classes != len(self.classes):
            raise ValueError(f"num_classes={self.num_classes} but {len(self.classes)} class names given")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(
                f"mean/std must have in_chans={self.in_chans} entries, got {len(self.mean)}/{len(self.std)}"
            )


class RandomTranslate:
    """Translate a ``C x H x W`` tensor by up to ``max_shift`` pixels in each direction.

    Implemented as pad-by-``max_shift`` (with the constant ``fill``, i.e. the normalised background
    value) followed by a random crop back to ``H x W``. Offsets come from ``torch.randint`` (global RNG).
    """

    def __init__(self, max_shift: int, fill: float | Tensor = 0.0) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.max_shift = int(max_shift)
        fill_t = torch.as_tensor(fill, dtype=torch.float32).reshape(-1)
        self.fill = fill_t

    def __call__(self, img: Tensor) -> Tensor:
        s = self.max_shift
        if s == 0:
            return img
        c, h, w = img.shape
        top, left = torch.randint(0, 2 * s + 1, (2,)).tolist()
        if top == s and left == s:
            return img
        if self.fill.numel() == 1:
            padded = F.pad(img, (s, s, s, s), value=float(self.fill))
        else:  # per-channel background value
            padded = self.fill.to(img.dtype).view(-1, 1, 1).expand(c, h + 2 * s, w + 2 * s).clone()
            padded[:, s : s + h, s : s + w] = img
        return padded[:, top : top + h, left : left + w]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_shift={self.max_shift})"


class InMemoryImageDataset(Dataset[tuple[Tensor, int]]):
    """Images held as one ``N x C x H x W`` float32 tensor plus ``N`` integer labels.

    ``transform`` (optional) is applied to the stored (already normalised) image in ``__getitem__``.
    ``out_chans`` > ``C`` (only from 1) repeats a grey channel, without storing the copies.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: tuple[str, ...],
        transform: Callable[[Tensor], Tensor] | None = None,
        out_chans: int | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected images N x C x H x W and N labels, got {tuple(images.shape)}, "
                f"{tuple(labels.shape)}"
            )
        self.images = images.to(torch.float32).contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.classes = classes
        self.transform = transform
        chans = images.shape[1]
        if out_chans is not None and out_chans != chans and chans != 1:
            raise ValueError(f"can only repeat a single channel, stored images have {chans}")
        self.out_chans = out_chans if out_chans is not None else chans

    @property
    def targets(self) -> list[int]:
        """Labels as a list (same attribute name as torchvision's folder datasets)."""
        return self.labels.tolist()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.out_chans != img.shape[0]:
            img = img.expand(self.out_chans, -1, -1)
        return img, int(self.labels[index])


def check_fraction(val_fraction: float) -> float:
    """Validate a validation fraction (strictly between 0 and 1)."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return float(val_fraction)
