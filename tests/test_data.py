"""Tests for ``xnorpp.data``: mnist5k, synthetic, imagefolder and imagenet datasets."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from xnorpp.data import (
    DATASETS,
    DatasetInfo,
    ImageLoadError,
    InMemoryImageDataset,
    build_datasets,
)

# ----------------------------------------------------------------------------------------- helpers


def _write_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(colour, dtype=np.float64) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def make_tree(
    root: Path,
    classes: list[str],
    n: int,
    size: tuple[int, int] = (40, 40),
    ext: str = ".png",
) -> Path:
    """``root/<class>/img{i}{ext}``; alternate png/jpg when ``ext`` is ``"mixed"``."""
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            e = (".png" if i % 2 else ".jpg") if ext == "mixed" else ext
            _write_image(root / cls / f"img{i}{e}", size, COLOURS[c % len(COLOURS)], seed=100 * c + i)
    return root


def _is_shift(aug: Tensor, base: Tensor, max_shift: int, fill: float) -> bool:
    """Is ``aug`` equal to ``base`` translated by some (dy, dx) with |dy|, |dx| <= max_shift?"""
    s = max_shift
    padded = torch.nn.functional.pad(base, (s, s, s, s), value=fill)
    h, w = base.shape[-2:]
    return any(
        torch.equal(padded[:, t : t + h, u : u + w], aug) for t in range(2 * s + 1) for u in range(2 * s + 1)
    )


# ----------------------------------------------------------------------------------------- registry


def test_bad_name_lists_choices() -> None:
    with pytest.raises(ValueError) as exc:
        build_datasets("svhn")
    msg = str(exc.value)
    assert "svhn" in msg and "DATASETS.register" in msg  # how to add one
    for name in DATASETS:
        assert name in msg


def test_registry_names() -> None:
    assert tuple(DATASETS) == ("mnist5k", "imagenet", "imagefolder", "synthetic", "cifar10", "cifar100")


def test_info_validates() -> None:
    with pytest.raises(ValueError):
        DatasetInfo(num_classes=3, in_chans=1, image_size=8, classes=("a", "b"), mean=(0.0,), std=(1.0,))
    with pytest.raises(ValueError):
        DatasetInfo(num_classes=1, in_chans=3, image_size=8, classes=("a",), mean=(0.0,), std=(1.0,))


# ----------------------------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist() -> tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]:
    train, val, info = build_datasets("mnist5k")
    assert isinstance(train, InMemoryImageDataset) and isinstance(val, InMemoryImageDataset)
    return train, val, info


def test_mnist_sizes_shapes(mnist: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]) -> None:
    train, val, info = mnist
    assert len(train) + len(val) == 5000
    assert len(val) == 500
    x, y = val[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    xt, yt = train[0]
    assert xt.shape == (1, 32, 32) and xt.dtype == torch.float32 and isinstance(yt, int)
    assert info.num_classes == 10 and info.in_chans == 1 and info.image_size == 32
    assert info.classes == tuple(str(i) for i in range(10))
    # 2-pixel zero padding survives normalisation as the background value
    bg = (0.0 - info.mean[0]) / info.std[0]
    assert torch.allclose(val.images[:, :, :2, :], torch.full_like(val.images[:, :, :2, :], bg))


def test_mnist_val_fraction() -> None:
    train, val, _ = build_datasets("mnist5k", val_fraction=0.2, augment=False)
    assert (len(train), len(val)) == (4000, 1000)


def test_mnist_stratified(mnist: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]) -> None:
    train, val, _ = mnist
    assert torch.bincount(val.labels, minlength=10).tolist() == [50] * 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [450] * 10


def test_mnist_normalisation(mnist: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]) -> None:
    train, val, info = mnist
    assert abs(float(train.images.mean())) < 1e-4
    assert abs(float(train.images.std()) - 1.0) < 1e-4
    assert abs(float(val.images.mean())) < 0.05  # same statistics applied to val
    assert 0.05 < info.mean[0] < 0.2 and 0.2 < info.std[0] < 0.4


def test_mnist_deterministic(mnist: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]) -> None:
    train, val, info = mnist
    train2, val2, info2 = build_datasets("mnist5k")
    assert torch.equal(train.images, train2.images) and torch.equal(train.labels, train2.labels)
    assert torch.equal(val.images, val2.images) and torch.equal(val.labels, val2.labels)
    assert info == info2
    train3, _, _ = build_datasets("mnist5k", split_seed=1)
    assert not torch.equal(train.labels, train3.labels)


def test_mnist_image_size_and_channels() -> None:
    train, val, info = build_datasets("mnist5k", image_size=64, augment=False)
    assert train[0][0].shape == (1, 64, 64) and val[0][0].shape == (1, 64, 64)
    assert info.image_size == 64
    assert abs(float(train.images.mean())) < 1e-4
    train3, _, info3 = build_datasets("mnist5k", in_chans=3, augment=False)
    x, _ = train3[0]
    assert x.shape == (3, 32, 32) and info3.in_chans == 3 and len(info3.mean) == 3
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    with pytest.raises(ValueError, match="num_classes"):
        build_datasets("mnist5k", num_classes=100)


def test_mnist_augmentation(mnist: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]) -> None:
    train, val, info = mnist
    bg = (0.0 - info.mean[0]) / info.std[0]
    torch.manual_seed(0)
    changed = 0
    for i in range(20):
        x, _ = train[i]
        assert x.shape == (1, 32, 32)
        assert _is_shift(x, train.images[i], 2, bg)
        changed += not torch.equal(x, train.images[i])
    assert changed >= 10
    # reproducible from torch's global RNG alone (python's random is irrelevant)
    torch.manual_seed(123)
    random.seed(1)
    a = torch.stack([train[i][0] for i in range(8)])
    torch.manual_seed(123)
    random.seed(2)
    b = torch.stack([train[i][0] for i in range(8)])
    assert torch.equal(a, b)
    # val is never augmented
    for seed in range(5):
        torch.manual_seed(seed)
        for i in range(10):
            assert torch.equal(val[i][0], val.images[i])
    # augment=False leaves train untouched
    plain, _, _ = build_datasets("mnist5k", augment=False)
    assert all(torch.equal(plain[i][0], plain.images[i]) for i in range(10))


# ----------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_classes() -> None:
    train, val, info = build_datasets("synthetic")
    assert (len(train), len(val)) == (512, 128)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert info.num_classes == 10 and info.in_chans == 3 and len(info.classes) == 10
    assert torch.bincount(train.labels, minlength=10).min() >= 51  # balanced

    train, val, info = build_datasets("synthetic", num_samples=40, num_classes=4, in_chans=1, image_size=16)
    assert (len(train), len(val)) == (40, 10)
    assert train[3][0].shape == (1, 16, 16) and info.image_size == 16 and info.num_classes == 4
    assert set(train.labels.tolist()) == {0, 1, 2, 3}
    _, val, _ = build_datasets("synthetic", num_samples=8, num_classes=10)
    assert len(val) == 20  # max(num_samples // 4, 2 * num_classes)


def test_synthetic_deterministic() -> None:
    torch.manual_seed(0)
    a_train, a_val, _ = build_datasets("synthetic", num_samples=64)
    torch.manual_seed(1)  # the global RNG must not matter
    b_train, b_val, _ = build_datasets("synthetic", num_samples=64)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert torch.equal(a_val.images, b_val.images) and torch.equal(a_val.labels, b_val.labels)
    c_train, _, _ = build_datasets("synthetic", num_samples=64, split_seed=1)
    assert not torch.equal(a_train.images, c_train.images)
    assert torch.equal(a_train[5][0], a_train[5][0])  # no augmentation


def test_synthetic_learnable() -> None:
    train, val, info = build_datasets("synthetic", num_samples=200)
    means = torch.stack([train.images[train.labels == k].mean(0) for k in range(info.num_classes)])
    dist = torch.cdist(val.images.flatten(1), means.flatten(1))
    acc = float((dist.argmin(1) == val.labels).float().mean())
    assert acc > 0.9  # chance is 0.1
    assert abs(float(train.images.std()) - 1.0) < 0.1


# ----------------------------------------------------------------------------------------- imagefolder


CLASSES3 = ["cat", "dog", "fox"]


@pytest.fixture()
def split_tree(tmp_path: Path) -> Path:
    make_tree(tmp_path / "train", CLASSES3, 4, ext="mixed")
    make_tree(tmp_path / "val", CLASSES3, 2, ext=".jpg")
    return tmp_path


def test_imagefolder_split_layout(split_tree: Path) -> None:
    train, val, info = build_datasets("imagefolder", root=str(split_tree), image_size=32)
    assert (len(train), len(val)) == (12, 6)
    assert info.classes == tuple(CLASSES3) and info.num_classes == 3 and info.in_chans == 3
    assert info.image_size == 32 and len(info.mean) == 3
    for ds in (train, val):
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert sorted({val[i][1] for i in range(len(val))}) == [0, 1, 2]
    # val transform is deterministic
    torch.manual_seed(0)
    v1 = val[1][0]
    torch.manual_seed(1)
    assert torch.equal(v1, val[1][0])


def test_imagefolder_validation_alias(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", CLASSES3, 2)
    make_tree(tmp_path / "validation", CLASSES3, 1)
    train, val, _ = build_datasets("imagefolder", root=tmp_path, image_size=24)
    assert (len(train), len(val)) == (6, 3)
    assert val[0][0].shape == (3, 24, 24)


def test_imagefolder_train_augmentation_uses_torch_rng(split_tree: Path) -> None:
    train, _, _ = build_datasets("imagefolder", root=split_tree, image_size=32)
    torch.manual_seed(7)
    random.seed(1)
    a = torch.stack([train[i][0] for i in range(4)])
    torch.manual_seed(7)
    random.seed(2)
    b = torch.stack([train[i][0] for i in range(4)])
    assert torch.equal(a, b)
    torch.manual_seed(8)
    c = torch.stack([train[i][0] for i in range(4)])
    assert not torch.equal(a, c)
    plain, _, _ = build_datasets("imagefolder", root=split_tree, image_size=32, augment=False)
    torch.manual_seed(0)
    p0 = plain[0][0]
    torch.manual_seed(1)
    assert torch.equal(p0, plain[0][0])


def test_imagefolder_single_tree(tmp_path: Path) -> None:
    make_tree(tmp_path, CLASSES3, 4)
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    train, val, info = build_datasets("imagefolder", root=tmp_path, image_size=32, val_fraction=0.25)
    assert (len(train), len(val)) == (9, 3)
    assert info.classes == tuple(CLASSES3)
    assert sorted(val.targets) == [0, 1, 2]  # stratified
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert train[0][0].shape == (3, 32, 32) and val[0][0].shape == (3, 32, 32)
    train2, val2, _ = build_datasets("imagefolder", root=tmp_path, image_size=32, val_fraction=0.25)
    assert val2.samples == val.samples and train2.samples == train.samples
    _, val3, _ = build_datasets("imagefolder", root=tmp_path, image_size=32, val_fraction=0.25, split_seed=3)
    assert len(val3) == 3


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"root/train/<class>"):
        build_datasets("imagefolder", root=None)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as exc:
        build_datasets("imagefolder", root=missing)
    assert str(missing) in str(exc.value) and "root/<class>" in str(exc.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        build_datasets("imagefolder", root=empty)


def test_imagefolder_train_without_val(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", CLASSES3, 2)
    with pytest.raises(FileNotFoundError) as exc:
        build_datasets("imagefolder", root=tmp_path)
    assert "no val folder" in str(exc.value) and str(tmp_path / "train") in str(exc.value)


def test_imagefolder_empty_class_folder(split_tree: Path) -> None:
    (split_tree / "train" / "zebra").mkdir()
    (split_tree / "val" / "zebra").mkdir()
    (split_tree / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError) as exc:
        build_datasets("imagefolder", root=split_tree)
    assert str(split_tree / "train" / "zebra") in str(exc.value)


def test_imagefolder_class_mismatch(split_tree: Path) -> None:
    make_tree(split_tree / "train", ["emu"], 1)
    make_tree(split_tree / "val", ["gnu"], 1)
    with pytest.raises(ValueError) as exc:
        build_datasets("imagefolder", root=split_tree)
    msg = str(exc.value)
    assert "only in train: ['emu']" in msg and "only in val: ['gnu']" in msg


def test_imagefolder_corrupt_image(split_tree: Path) -> None:
    bad = split_tree / "val" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _, val, _ = build_datasets("imagefolder", root=split_tree, image_size=32)  # construction is fine
    idx = next(i for i, (p, _) in enumerate(val.samples) if p.endswith("broken.jpg"))
    with pytest.raises(ImageLoadError) as exc:
        val[idx]
    assert str(bad) in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_imagefolder_count_checks(split_tree: Path) -> None:
    with pytest.raises(ValueError, match="found 3 class folders"):
        build_datasets("imagefolder", root=split_tree, num_classes=10)
    with pytest.raises(ValueError, match="in_chans"):
        build_datasets("imagefolder", root=split_tree, in_chans=1)


def test_imagefolder_single_tree_too_small(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a", "b"], 2)
    make_tree(tmp_path, ["c"], 1)
    with pytest.raises(ValueError) as exc:
        build_datasets("imagefolder", root=tmp_path)
    assert str(tmp_path / "c") in str(exc.value)


# ----------------------------------------------------------------------------------------- imagenet


WNIDS = ["n01440764", "n01443537"]


@pytest.fixture()
def fake_imagenet(tmp_path: Path) -> Path:
    make_tree(tmp_path / "train", WNIDS, 2, size=(300, 260), ext=".JPEG")
    make_tree(tmp_path / "val", WNIDS, 1, size=(260, 300), ext=".JPEG")
    return tmp_path


def test_imagenet_transforms(fake_imagenet: Path) -> None:
    train, val, info = build_datasets("imagenet", root=fake_imagenet, image_size=224)
    assert info.classes == tuple(WNIDS) and info.image_size == 224
    assert info.mean == pytest.approx((0.485, 0.456, 0.406)) and info.std == pytest.approx(
        (0.229, 0.224, 0.225)
    )
    torch.manual_seed(0)
    assert train[0][0].shape == (3, 224, 224) and train[3][0].shape == (3, 224, 224)
    v = val[0][0]
    assert v.shape == (3, 224, 224) and v.dtype == torch.float32
    torch.manual_seed(99)
    assert torch.equal(v, val[0][0])

    tr_steps = train.transform.transforms
    rrc = next(t for t in tr_steps if isinstance(t, T.RandomResizedCrop))
    assert rrc.size == (224, 224) and tuple(rrc.scale) == (0.08, 1.0)
    assert rrc.interpolation == T.InterpolationMode.BILINEAR
    assert any(isinstance(t, T.RandomHorizontalFlip) and t.p == 0.5 for t in tr_steps)
    cj = next(t for t in tr_steps if isinstance(t, T.ColorJitter))
    assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.saturation == pytest.approx((0.6, 1.4))
    assert cj.hue is None

    val_steps = val.transform.transforms
    resize = next(t for t in val_steps if isinstance(t, T.Resize))
    crop = next(t for t in val_steps if isinstance(t, T.CenterCrop))
    assert resize.size in (256, [256], (256,)) and tuple(crop.size) == (224, 224)


def test_imagenet_image_size(fake_imagenet: Path) -> None:
    train, val, info = build_datasets("imagenet", root=fake_imagenet, image_size=64, augment=True)
    assert train[0][0].shape == (3, 64, 64) and val[0][0].shape == (3, 64, 64)
    assert info.image_size == 64


def test_imagenet_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as exc:
        build_datasets("imagenet", root=None)
    assert "root/train/<wnid>" in str(exc.value) and "class folders" in str(exc.value)
    # a single class-per-folder tree is not an ImageNet layout
    make_tree(tmp_path / "flat", WNIDS, 1)
    with pytest.raises(FileNotFoundError) as exc2:
        build_datasets("imagenet", root=tmp_path / "flat")
    assert str(tmp_path / "flat") in str(exc2.value) and "root/val/<wnid>" in str(exc2.value)
    # val images not sorted into class folders
    make_tree(tmp_path / "in" / "train", WNIDS, 1, ext=".JPEG")
    _write_image(tmp_path / "in" / "val" / "ILSVRC2012_val_00000001.JPEG", (32, 32), (1, 2, 3), 0)
    with pytest.raises(FileNotFoundError) as exc3:
        build_datasets("imagenet", root=tmp_path / "in")
    assert str(tmp_path / "in" / "val") in str(exc3.value) and "class folders" in str(exc3.value)
