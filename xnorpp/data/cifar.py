"""``cifar10`` and ``cifar100``: torchvision's CIFAR datasets, read from ``root``, never downloaded.

``root`` is the folder holding ``cifar-10-batches-py`` (or ``cifar-100-python``), or that folder itself,
as extracted from the official archives. Train is the 50,000-image training set, validation the
10,000-image test set (what the literature reports). Images are 32x32; the default augmentation is
``small`` (pad 4 px, random crop, flip), normalised with the training set's per-channel mean and std.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchvision.datasets import CIFAR10, CIFAR100

from .augment import build_transforms
from .base import DatasetInfo

__all__ = ["CIFAR_SPECS", "build_cifar"]

# name -> (torchvision class, archive, per-channel mean and std of the training set)
CIFAR_SPECS: dict[str, tuple[type[CIFAR10], str, tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (CIFAR10, "cifar-10-python.tar.gz", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (CIFAR100, "cifar-100-python.tar.gz", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_URL = "https://www.cs.toronto.edu/~kriz/"


def _local(base: type[CIFAR10]) -> type[CIFAR10]:
    """``base`` reading the files that are there: no md5 check (that belongs to a download; it would
    refuse any other copy of the format, such as a test's), no download."""
    return type(
        f"Local{base.__name__}",
        (base,),
        {
            "train_list": [[name, None] for name, _ in base.train_list],
            "test_list": [[name, None] for name, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        },
    )


def _find_root(name: str, root: str | os.PathLike[str] | None, folder: str, archive: str) -> Path:
    fetch = (
        f"download {_URL}{archive} and extract it there (`tar xzf {archive} -C <data.root>`), or point "
        f"data.root at the folder holding {folder}/"
    )
    if root is None or str(root) == "":
        raise ValueError(f"{name}: no dataset root given; {fetch}")
    path = Path(root).expanduser().resolve()
    if path.name == folder:
        path = path.parent
    if not (path / folder).is_dir():
        raise FileNotFoundError(f"{name}: {str(path / folder)!r} does not exist; {fetch}")
    return path


def build_cifar(
    name: str,
    root: str | os.PathLike[str] | None,
    *,
    image_size: int = 32,
    augment: str | bool = "small",
    hflip: bool = True,
    num_classes: int | None = None,
    in_chans: int | None = None,
    crop_pct: float | None = None,
    interpolation: str = "bilinear",
    **policy_options: Any,
) -> tuple[CIFAR10, CIFAR10, DatasetInfo]:
    """CIFAR-10 or CIFAR-100 (``name``) from ``root``: ``(train, test as val, info)``.

    ``augment``: the train policy (``small`` by default; ``True`` = ``small``, ``False`` = none);
    ``image_size`` other than 32 resizes. ``num_classes``/``in_chans``, if given, must be 10 or 100 / 3.
    """
    cls, archive, mean, std = CIFAR_SPECS[name]
    path = _find_root(name, root, cls.base_folder, archive)
    missing = [f for f, _ in [*cls.train_list, *cls.test_list, [cls.meta["filename"], None]]
               if not (path / cls.base_folder / f).is_file()]  # fmt: skip
    if missing:
        raise FileNotFoundError(
            f"{name}: {str(path / cls.base_folder)!r} lacks {', '.join(missing)}: an incomplete extraction? "
            f"Extract {_URL}{archive} again into {str(path)!r}"
        )
    train_tf, val_tf, policy = build_transforms(
        augment, dataset=name, default="small", image_size=image_size, input="pil", mean=mean, std=std,
        hflip=hflip, crop_pct=crop_pct, interpolation=interpolation, **policy_options,
    )  # fmt: skip
    local = _local(cls)
    try:
        train = local(str(path), train=True, transform=train_tf)
        val = local(str(path), train=False, transform=val_tf)
    except Exception as e:  # a truncated or foreign pickle: unusable, whatever the exception type
        raise ValueError(
            f"{name}: cannot read the batches in {str(path / cls.base_folder)!r} ({type(e).__name__}: {e}); "
            f"extract {_URL}{archive} again"
        ) from e
    classes = tuple(train.classes)
    if num_classes is not None and int(num_classes) != len(classes):
        raise ValueError(f"{name} has {len(classes)} classes, but num_classes={num_classes} was given")
    if in_chans not in (None, 3):
        raise ValueError(f"{name}: images are RGB (in_chans=3), got in_chans={in_chans}")
    info = DatasetInfo(
        num_classes=len(classes), in_chans=3, image_size=int(image_size), classes=classes, mean=mean, std=std,
        augment=policy,
    )  # fmt: skip
    return train, val, info
