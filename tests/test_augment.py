"""Augmentation policies (``data.augment``), CIFAR, and training on a user's folder of small images."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xnorpp.data import AUGMENTATIONS, build_datasets, build_transforms, register_policy, resolve_policy
from xnorpp.run import train


# ------------------------------------------------------------------------------------------ choosing
@pytest.mark.parametrize(
    ("augment", "size", "default", "policy"),
    [("auto", 32, "auto", "small"), ("auto", 64, "auto", "small"), ("auto", 65, "auto", "imagenet"),
     ("auto", 224, "auto", "imagenet"), (True, 32, "auto", "small"), ("true", 224, "auto", "imagenet"),
     (True, 32, "translate", "translate"), (None, 32, "small", "small"), (False, 224, "imagenet", "none"),
     ("false", 32, "small", "none"), ("Imagenet", 32, "auto", "imagenet"), ("none", 32, "auto", "none")],
)  # fmt: skip
def test_policy_choice(augment: object, size: int, default: str, policy: str) -> None:
    assert resolve_policy(augment, size, default)[0] == policy


def test_unknown_policy_lists_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"unknown data.augment 'cutmix'; valid choices: auto, true, false, imagenet"
    ):
        resolve_policy("cutmix", 32, "auto")


def test_the_choice_and_its_reason_are_logged_and_imagenet_on_small_images_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = _tree(tmp_path, n=2)
    caplog.set_level(logging.INFO)
    build_datasets("imagefolder", root=tree, image_size=32, val_fraction=0.5)
    assert any(
        "augmentation small" in r.getMessage() and "32 px <= 64 px" in r.getMessage() for r in caplog.records
    )
    caplog.clear()
    build_datasets("imagefolder", root=tree, image_size=32, augment="imagenet", val_fraction=0.5)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "8% of the area" in warning and "data.augment=small" in warning


def test_in_memory_digits_take_only_geometric_policies() -> None:
    with pytest.raises(
        ValueError, match=r"data.augment=imagenet needs pil input.*choose one of: small, translate, none"
    ):
        build_datasets("mnist5k", augment="imagenet")


def test_unknown_policy_option_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) data.pad_px; the augmentation policies take"):
        build_datasets("mnist5k", pad_px=3)


# ------------------------------------------------------------------------------------------ geometry
def _picture(size: int = 32, seed: int = 0) -> Image.Image:
    """An RGB picture with no mirror symmetry."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(1, 255, (size, size, 3), dtype=np.uint8))


def _offsets(
    out: torch.Tensor, base: torch.Tensor, pad: int, mode: str = "constant"
) -> set[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) that turns ``base`` (padded by ``pad``: zeros, or reflected) into ``out``."""
    padded = torch.nn.functional.pad(base, (pad, pad, pad, pad), mode=mode)
    h, w = base.shape[-2:]
    found = set()
    for t in range(2 * pad + 1):
        for u in range(2 * pad + 1):
            crop = padded[:, t : t + h, u : u + w]
            for flipped, view in ((False, crop), (True, crop.flip(-1))):
                if torch.equal(view, out):
                    found.add((t - pad, u - pad, flipped))
    return found


@pytest.mark.parametrize(("policy", "hflip", "pad", "flips", "pad_mode"),
                         [("small", True, 4, True, None), ("small", False, 4, False, "constant"),
                          ("translate", True, 2, False, None)])  # fmt: skip
def test_small_and_translate_shift_within_their_range_and_flip_as_configured(
    policy: str, hflip: bool, pad: int, flips: bool, pad_mode: str | None
) -> None:
    """Image files are padded by reflection unless ``data.pad_mode`` says otherwise (``constant``: black)."""
    identity = {"mean": (0.0,) * 3, "std": (1.0,) * 3}  # outputs stay in [0, 1]: comparable to the input
    options = {"pad_mode": pad_mode} if pad_mode else {}
    train_tf, val_tf, name = build_transforms(
        policy, dataset="t", default="auto", image_size=32, input="pil", hflip=hflip, **identity, **options
    )
    assert name == policy
    picture = _picture()
    base = val_tf(picture)
    assert torch.equal(base, torch.from_numpy(np.asarray(picture)).permute(2, 0, 1).float() / 255)
    torch.manual_seed(0)
    seen = set()
    for _ in range(400):
        (offset,) = _offsets(train_tf(picture), base, pad, "reflect" if pad_mode is None else pad_mode)
        seen.add(offset)
    assert {max(abs(dy), abs(dx)) for dy, dx, _ in seen} == set(range(pad + 1))  # the whole range is used
    assert any(f for _, _, f in seen) is flips and any(not f for _, _, f in seen)


def test_mnist5k_small_policy_pads_with_black_and_does_not_flip_digits() -> None:
    train_ds, _, info = build_datasets("mnist5k", augment="small")
    assert info.augment == "small"
    black = -info.mean[0] / info.std[0]
    torch.manual_seed(0)
    for i in range(30):
        offsets = _offsets(train_ds[i][0] - black, train_ds.images[i] - black, 4)
        assert any(not f for _, _, f in offsets)  # an unflipped shift (mnist5k: data.hflip=false)


def test_a_policy_registered_from_user_code_is_used(tmp_path: Path) -> None:
    calls = []

    @register_policy("test_invert", inputs=("pil",), about="inverted colours")
    def invert(ctx):  # type: ignore[no-untyped-def]
        from torchvision import transforms as T

        calls.append(ctx.image_size)
        return T.Compose([T.Resize(ctx.image_size), T.CenterCrop(ctx.image_size), T.ToTensor(),
                          T.Lambda(lambda x: 1 - x), T.Normalize(ctx.mean, ctx.std)])  # fmt: skip

    try:
        train_ds, val_ds, info = build_datasets("imagefolder", root=_tree(tmp_path, n=2), image_size=16,
                                                val_fraction=0.5, augment="test_invert", mean=(0.0,) * 3, std=(1.0,) * 3)  # fmt: skip
        assert calls == [16] and info.augment == "test_invert"
        assert torch.allclose(
            train_ds[0][0], 1 - val_ds.transform(Image.open(train_ds.samples[0][0]).convert("RGB"))
        )
    finally:
        AUGMENTATIONS.unregister("test_invert")
    assert "test_invert" not in AUGMENTATIONS


# --------------------------------------------------------------------------------------------- CIFAR
def _cifar(root: Path, name: str, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """A tiny archive in the official pickle format (5 train batches + test + meta)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, label_key, names_key, classes = root / "cifar-10-batches-py", "labels", "label_names", 10
        files = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        meta = "batches.meta"
    else:
        folder, label_key, names_key, classes = (
            root / "cifar-100-python",
            "fine_labels",
            "fine_label_names",
            100,
        )
        files, meta = ["train", "test"], "meta"
    folder.mkdir(parents=True)
    for f in files:
        n = n_test if "test" in f else n_train
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, n).tolist()}  # fmt: skip
        (folder / f).write_bytes(pickle.dumps(batch))
    (folder / meta).write_bytes(pickle.dumps({names_key: [f"c{i}" for i in range(classes)]}))
    return root


@pytest.mark.parametrize(("name", "n_train", "classes"), [("cifar10", 100, 10), ("cifar100", 20, 100)])
def test_cifar_reads_the_extracted_archive(tmp_path: Path, name: str, n_train: int, classes: int) -> None:
    root = _cifar(tmp_path, name)
    train_ds, val_ds, info = build_datasets(name, root=root)
    assert (len(train_ds), len(val_ds), info.num_classes, info.augment) == (n_train, 10, classes, "small")
    x, y = train_ds[0]
    assert x.shape == (3, 32, 32) and 0 <= y < classes
    # validation is the raw image, normalised with the dataset's statistics
    raw = torch.from_numpy(val_ds.data[3]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    assert torch.allclose(val_ds[3][0], (raw - mean) / std, atol=1e-6)
    # the folder itself works as root too
    assert len(build_datasets(name, root=next(root.iterdir()))[0]) == n_train


def test_cifar_missing_or_incomplete_names_the_path_and_the_archive(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        build_datasets("cifar10", root=tmp_path / "nowhere")
    msg = str(err.value)
    assert (
        "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg and str(tmp_path / "nowhere") in msg
    )
    root = _cifar(tmp_path / "partial", "cifar10")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3: an incomplete extraction"):
        build_datasets("cifar10", root=root)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read the batches"):
        build_datasets("cifar10", root=root)


def test_cifar10_trains_through_the_config(make_cfg, tmp_path: Path) -> None:
    root = _cifar(tmp_path / "data", "cifar10")
    results = train(make_cfg("data=cifar10", f"data.root={root}", "data.batch_size=8", "data.num_workers=0",
                             "trainer.epochs=1", "trainer.limit_train_batches=2", "logger=none", "trainer.threads=1",
                             "trainer.kernels=eager", tiny=False))  # fmt: skip
    assert results["global_step"] == 2 and results["data_augment"] == "small"
    assert results["model_args"]["stem"] == "small" and results["model_args"]["num_classes"] == 10


# ----------------------------------------------------------------------------- a user's image folder
def _tree(root: Path, n: int = 6, classes: int = 3, seed: int = 0) -> Path:
    """``root/c<k>/*``: small images of mixed modes (L, RGB, RGBA, P), sizes (20-40 px) and formats."""
    rng = np.random.default_rng(seed)
    modes = ["L", "RGB", "RGBA", "P"]
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            size = int(rng.integers(20, 41)), int(rng.integers(20, 41))
            arr = np.clip(rng.normal(60 + 70 * k, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr).convert(modes[i % 4])
            img.save(root / f"c{k}" / f"{i}.{'jpg' if i % 5 == 4 and img.mode in ('L', 'RGB') else 'png'}")
    return root


def test_training_on_small_pngs_does_not_depend_on_the_number_of_workers(make_cfg, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "pngs", n=12)
    common = ["data=imagefolder", f"data.root={tree}", "data.image_size=32", "data.batch_size=6",
              "data.eval_batch_size=6", "data.val_fraction=0.25", "trainer.epochs=2", "logger=none",
              "trainer.threads=1", "trainer.kernels=eager", "binarization=full_binary"]  # fmt: skip
    runs = {
        w: train(make_cfg(*common, f"data.num_workers={w}", tiny=False, out=tmp_path / f"w{w}"))
        for w in (0, 2)
    }
    assert runs[0]["data_augment"] == "small"  # auto at 32 px
    for key in ("val/top1", "val/loss", "train/loss", "best/val/top1", "global_step"):
        assert runs[0][key] == runs[2][key], key
    assert [h["val/loss"] for h in runs[0]["history"]] == [h["val/loss"] for h in runs[2]["history"]]
    saved = json.loads((tmp_path / "w2" / "results.json").read_text())
    assert saved["global_step"] == 2 * 4  # 27 train images, batches of 6


def test_pad_mode_is_checked_and_applies_to_image_files_only() -> None:
    with pytest.raises(ValueError, match=r"data\.pad_mode='mirror': valid choices are reflect, edge"):
        build_transforms("small", dataset="t", default="auto", image_size=32, input="pil", mean=(0.5,) * 3,
                         std=(0.5,) * 3, pad_mode="mirror")  # fmt: skip
    with pytest.raises(ValueError, match="in-memory data pads with black"):
        build_datasets("mnist5k", augment="small", pad_mode="reflect")
    build_datasets("mnist5k", augment="small", pad_mode="constant")  # black, as without the key
