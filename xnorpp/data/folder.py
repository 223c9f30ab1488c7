"""``imagefolder`` and ``imagenet``: class-per-folder image trees read from disk.

Layouts:

- split: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (``root/validation`` also works);
- single (``imagefolder`` only): ``root/<class>/*.jpg``, split into train/val by a fixed stratified
  fraction (``val_fraction``, ``split_seed``).

ImageNet uses the split layout with the 1000 ``<wnid>`` folders in both ``train`` and ``val`` (the
validation images must be sorted into class folders too).

Train augmentation is a named policy (:mod:`xnorpp.data.augment`): ``imagefolder`` defaults to
``auto`` (``small`` at 64 px and below, the original's ImageNet recipe above), ``imagenet`` to the
original's recipe: ``RandomResizedCrop(image_size, scale=(0.08, 1))`` + horizontal flip +
``ColorJitter(0.4, 0.4, 0.4)``. Validation resizes to ``image_size / crop_pct`` (256 for 224) and centre
crops.

Layout problems (missing root, empty class folder, train/val class mismatch, unsorted val images) are
reported when the datasets are built; an unreadable image raises :class:`ImageLoadError` (naming the
file) when it is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .augment import build_transforms
from .base import DatasetInfo, check_fraction

__all__ = [
    "CheckedImageFolder",
    "FolderSubset",
    "ImageLoadError",
    "build_image_folder",
    "build_imagenet",
    "load_rgb",
]

IMAGEFOLDER_LAYOUT = (
    "root/train/<class>/*.jpg and root/val/<class>/*.jpg (root/validation also accepted), "
    "or root/<class>/*.jpg (split into train/val automatically)"
)
IMAGENET_LAYOUT = (
    "root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (1000 class folders such as n01440764 in "
    "both; the 50,000 validation images must also be sorted into class folders, e.g. with the usual "
    "valprep.sh script)"
)
VAL_DIR_NAMES: tuple[str, ...] = ("val", "validation")


class ImageLoadError(ValueError):
    """An image file could not be opened or decoded; the message names the file."""


def load_rgb(path: str) -> Image.Image:
    """Load ``path`` as an RGB PIL image; any decoding failure raises :class:`ImageLoadError`."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # forces the full decode while the file is open
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file {path!r} disappeared since the dataset was indexed") from e
    except Exception as e:
        raise ImageLoadError(
            f"cannot read image file {path!r} ({type(e).__name__}: {e}). The file is corrupt, truncated "
            f"or not an image: delete or replace it."
        ) from e


def _limited(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class CheckedImageFolder(ImageFolder):
    """``ImageFolder`` with errors that name the offending path.

    Hidden folders (``.ipynb_checkpoints``...) are not classes; a tree without class folders, or with
    a class folder holding no image, raises ``FileNotFoundError`` at construction. Images are loaded
    with :func:`load_rgb`.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Any], Any] | None = None,
        layout: str = IMAGEFOLDER_LAYOUT,
    ) -> None:
        self.layout = layout
        super().__init__(str(root), transform=transform, loader=load_rgb, allow_empty=True)
        counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes))
        empty = [os.path.join(self.root, c) for c, n in zip(self.classes, counts, strict=True) if n == 0]
        if empty:
            exts = " ".join(sorted(IMG_EXTENSIONS))
            raise FileNotFoundError(
                f"class folder(s) with no images: {_limited(empty)}. Add images ({exts}) or remove the "
                f"folder(s) (in both train and val)."
            )

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(
                f"no class folders found in {str(directory)!r}. Expected layout: {self.layout}"
            )
        return classes, {c: i for i, c in enumerate(classes)}


class FolderSubset(Dataset[tuple[Tensor, int]]):
    """A subset of a :class:`CheckedImageFolder` with its own transform (for the single-tree split)."""

    def __init__(
        self, base: CheckedImageFolder, indices: Sequence[int], transform: Callable[[Any], Any]
    ) -> None:
        self.root = base.root
        self.classes = base.classes
        self.class_to_idx = base.class_to_idx
        self.loader = base.loader
        self.samples: list[tuple[str, int]] = [base.samples[i] for i in indices]
        self.targets: list[int] = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, target = self.samples[index]
        return self.transform(self.loader(path)), target


def _check_root(root: str | os.PathLike[str] | None, name: str, layout: str) -> Path:
    if root is None or str(root) == "":
        raise ValueError(f"{name}: no dataset root given. Pass root=<directory> laid out as {layout}")
    path = Path(root).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(
            f"{name}: dataset root {str(path)!r} does not exist. Point root at a directory laid out as "
            f"{layout}"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: dataset root {str(path)!r} is not a directory. Expected {layout}")
    return path


def _split_dirs(path: Path, name: str, layout: str, single_ok: bool) -> tuple[Path, Path] | None:
    """``(train_dir, val_dir)`` for the split layout, ``None`` for a single tree (if allowed)."""
    train_dir = path / "train"
    val_dir = next((path / v for v in VAL_DIR_NAMES if (path / v).is_dir()), None)
    has_train = train_dir.is_dir()
    if has_train and val_dir is not None:
        return train_dir, val_dir
    if has_train or val_dir is not None:
        present, missing = (str(train_dir), "val") if has_train else (str(val_dir), "train")
        hint = f"; or, to split a single tree automatically, set root to {present!r}" if single_ok else ""
        raise FileNotFoundError(
            f"{name}: found {present!r} but no {missing} folder next to it in {str(path)!r}. Expected "
            f"{layout}{hint}"
        )
    if not single_ok:
        raise FileNotFoundError(
            f"{name}: {str(path)!r} has no 'train' and 'val' folders. Expected layout: {layout}"
        )
    return None


def _check_val_sorted(val_dir: Path, layout: str) -> None:
    has_dirs = False
    loose = 0
    with os.scandir(val_dir) as it:
        for e in it:
            if e.is_dir() and not e.name.startswith("."):
                has_dirs = True
                break
            if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS):
                loose += 1
    if not has_dirs and loose:
        raise FileNotFoundError(
            f"{str(val_dir)!r} holds {loose} images directly but no class folders: the validation images "
            f"must be arranged in class folders. Expected layout: {layout}"
        )


def _check_same_classes(train: CheckedImageFolder, val: CheckedImageFolder) -> None:
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    raise ValueError(
        f"class folders differ between {train.root!r} ({len(train.classes)} classes) and {val.root!r} "
        f"({len(val.classes)} classes): only in train: [{_limited(only_train)}]; only in val: "
        f"[{_limited(only_val)}]. Both splits need the same class folders."
    )


def _check_counts(name: str, found: int, num_classes: int | None, in_chans: int | None) -> None:
    if num_classes is not None and num_classes != found:
        raise ValueError(f"{name}: found {found} class folders but num_classes={num_classes} was requested")
    if in_chans not in (None, 3):
        raise ValueError(f"{name}: images are loaded as RGB (in_chans=3), got in_chans={in_chans}")


def _split_single_tree(
    name: str, path: Path, layout: str, val_fraction: float, split_seed: int, train_tf: Any, val_tf: Any
) -> tuple[FolderSubset, FolderSubset, list[str]]:
    """One ``<class>/*`` tree split into train and val, stratified by class (``val_fraction``, ``split_seed``)."""
    val_fraction = check_fraction(val_fraction)
    base = CheckedImageFolder(path, layout=layout)
    targets = np.asarray(base.targets, dtype=np.int64)
    counts = np.bincount(targets, minlength=len(base.classes))
    single = [os.path.join(base.root, c) for c, n in zip(base.classes, counts, strict=True) if n < 2]
    if single:
        raise ValueError(
            f"{name}: a stratified train/val split needs >= 2 images per class; these class folders "
            f"have 1: {_limited(single)}. Add images or provide root/train and root/val."
        )
    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(targets)), test_size=val_fraction, stratify=targets, random_state=split_seed
        )
    except ValueError as e:
        raise ValueError(
            f"{name}: cannot split {len(targets)} images of {len(base.classes)} classes in "
            f"{str(path)!r} with val_fraction={val_fraction}: {e}. Increase val_fraction or add images."
        ) from e
    classes = base.classes
    train_ds = FolderSubset(base, sorted(train_idx.tolist()), train_tf)
    val_ds = FolderSubset(base, sorted(val_idx.tolist()), val_tf)
    return train_ds, val_ds, classes


def _build(
    name: str,
    root: str | os.PathLike[str] | None,
    layout: str,
    single_ok: bool,
    *,
    image_size: int,
    val_fraction: float,
    split_seed: int,
    augment: str | bool,
    default_augment: str,
    num_classes: int | None,
    in_chans: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    **transform_kwargs: Any,
) -> tuple[Dataset[tuple[Tensor, int]], Dataset[tuple[Tensor, int]], DatasetInfo]:
    path = _check_root(root, name, layout)
    dirs = _split_dirs(path, name, layout, single_ok)
    train_tf, val_tf, policy = build_transforms(
        augment, dataset=name, default=default_augment, image_size=image_size, input="pil", mean=mean,
        std=std, **transform_kwargs,
    )  # fmt: skip

    train_ds: Dataset[tuple[Tensor, int]]
    val_ds: Dataset[tuple[Tensor, int]]
    if dirs is not None:
        train_dir, val_dir = dirs
        _check_val_sorted(val_dir, layout)
        train_folder = CheckedImageFolder(train_dir, transform=train_tf, layout=layout)
        val_folder = CheckedImageFolder(val_dir, transform=val_tf, layout=layout)
        _check_same_classes(train_folder, val_folder)
        classes = train_folder.classes
        train_ds, val_ds = train_folder, val_folder
    else:
        train_ds, val_ds, classes = _split_single_tree(
            name, path, layout, val_fraction, split_seed, train_tf, val_tf
        )

    _check_counts(name, len(classes), num_classes, in_chans)
    info = DatasetInfo(
        num_classes=len(classes),
        in_chans=3,
        image_size=image_size,
        classes=tuple(classes),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        augment=policy,
    )
    return train_ds, val_ds, info


def build_image_folder(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int = 224,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    augment: str | bool = "auto",
    num_classes: int | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    hflip: bool = True,
    crop_pct: float | None = None,
    interpolation: str = "bilinear",
    **policy_options: Any,
) -> tuple[Dataset[tuple[Tensor, int]], Dataset[tuple[Tensor, int]], DatasetInfo]:
    """Any class-per-folder tree (see the module docstring for the two layouts).

    ``image_size`` is the crop size; val images are resized to ``image_size / crop_pct`` first (``None``:
    0.875 above 64 px, 1.0 at 64 px and below). ``augment`` names the train policy (``auto``: ``small`` at
    64 px and below, ``imagenet`` above; ``False``: none); ``hflip=False`` turns flips off;
    ``policy_options`` (``scale``, ``ratio``, ``color_jitter``, ``padding``, ``max_shift``) tune it.
    ``val_fraction``/``split_seed`` only apply to the single-tree layout. ``num_classes``/``in_chans``, if
    given, must match the data (3 channels).
    """
    return _build(
        "imagefolder", root, IMAGEFOLDER_LAYOUT, True, image_size=image_size, val_fraction=val_fraction,
        split_seed=split_seed, augment=augment, default_augment="auto", num_classes=num_classes,
        in_chans=in_chans, mean=mean, std=std, hflip=hflip, crop_pct=crop_pct, interpolation=interpolation,
        **policy_options,
    )  # fmt: skip


def build_imagenet(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int = 224,
    augment: str | bool = "imagenet",
    num_classes: int | None = None,
    in_chans: int | None = None,
    hflip: bool = True,
    crop_pct: float | None = 0.875,
    interpolation: str = "bilinear",
    **policy_options: Any,
) -> tuple[Dataset[tuple[Tensor, int]], Dataset[tuple[Tensor, int]], DatasetInfo]:
    """ImageNet (ILSVRC-2012) in the ``root/train/<wnid>``, ``root/val/<wnid>`` layout.

    Train (``augment=imagenet``, the default): ``RandomResizedCrop(image_size, scale=(0.08, 1))``,
    ``ColorJitter(0.4, 0.4, 0.4)``, hflip; val: resize ``image_size / crop_pct`` (256), centre crop
    ``image_size`` (224); ImageNet mean/std. ``num_classes`` (e.g. 1000), if given, must match the number
    of class folders found.
    """
    return _build(
        "imagenet", root, IMAGENET_LAYOUT, False, image_size=image_size, val_fraction=0.1, split_seed=0,
        augment=augment, default_augment="imagenet", num_classes=num_classes, in_chans=in_chans,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, hflip=hflip, crop_pct=crop_pct,
        interpolation=interpolation, **policy_options,
    )  # fmt: skip
