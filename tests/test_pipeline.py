"""The input pipelines (``data.pipeline``): region decoding, the device half, the same augmentation as the
original's torchvision transforms (per sample and in distribution), worker independence, selection."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from xnorpp.bench_loader import main as bench_loader
from xnorpp.data import ImageLoadError, build_datasets
from xnorpp.data import decode as dec
from xnorpp.data.device_augment import DeviceAugment
from xnorpp.data.photos import make_photo, make_photo_tree
from xnorpp.data.pipeline import (
    DeviceDecode,
    DeviceLoader,
    EncodedFolder,
    SplitFolder,
    build_pipeline,
    resolve_pipeline,
)
from xnorpp.engine.loaders import SeededDataset, build_loaders
from xnorpp.run import train

CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
needs_region = pytest.mark.skipif(
    not dec.region_decoder_available(), reason=f"region decoder unavailable: {dec.region_decoder_reason()}"
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet-like photos: 500 x 375 JPEGs of ~90 KB, 2 classes, train and val."""
    return make_photo_tree(tmp_path_factory.mktemp("photos"), 8, classes=2, val=1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """A normalised ``3 x H x W`` image back in [0, 1]."""
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def _jpeg(path: Path, pixels: np.ndarray, **save: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", **save)
    return path


# --------------------------------------------------------------------------------------- decoding
@needs_region
@pytest.mark.parametrize(
    ("mode", "save"),
    [("RGB", {"quality": 90}), ("RGB", {"quality": 95, "subsampling": 0}), ("RGB", {"progressive": True}),
     ("L", {"quality": 90})],
)  # fmt: skip
def test_a_decoded_region_holds_the_full_decodes_pixels(
    tmp_path: Path, mode: str, save: dict[str, Any]
) -> None:
    rng = np.random.default_rng(0)
    path = _jpeg(
        tmp_path / "a.jpg", np.array(Image.fromarray(make_photo(rng, 203, 157)).convert(mode)), **save
    )
    img = dec.read_encoded(str(path))
    assert (img.width, img.height, img.jpeg) == (203, 157, True)
    full = np.asarray(Image.open(path).convert("RGB"))
    lib = dec._library()
    for _ in range(40):
        w, h = int(rng.integers(1, 204)), int(rng.integers(1, 158))
        top, left = int(rng.integers(0, 158 - h)), int(rng.integers(0, 204 - w))
        region = dec._turbo_region(lib, img, 8, (top, left, h, w))
        assert np.array_equal(region, full[top : top + h, left : left + w]), (top, left, h, w)


def _pil_resized_crop(path: Path, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    top, left, h, w = box
    crop = Image.open(path).convert("RGB").crop((left, top, left + w, top + h))
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)).astype(int)


@needs_region
def test_decode_resized_crop_is_pils_crop_and_resize(tmp_path: Path) -> None:
    """Full DCT scale: PIL's pixels within one level. Crops over twice the output size are decoded at 1/2
    or 1/4 scale: the same picture, a few levels apart on average (the DCT's low-pass, edges rounded)."""
    path = _jpeg(tmp_path / "big.jpg", make_photo(np.random.default_rng(1), 1200, 1000), quality=90)
    img = dec.read_encoded(str(path))
    for box, scale in [((10, 20, 300, 400), 8), ((0, 0, 1000, 1200), 2), ((100, 50, 460, 520), 4)]:
        assert dec.dct_scale(box[3], box[2], 224, 224) == scale
        ours = dec.decode_resized_crop(img, box, (224, 224)).numpy().astype(int)
        diff = np.abs(ours - _pil_resized_crop(path, box, 224))
        if scale == 8:
            assert diff.max() <= 1
        else:
            assert diff.mean() < 3.0 and np.percentile(diff, 99) < 20
        exact = dec.decode_resized_crop(img, box, (224, 224), dct_scaling=False).numpy().astype(int)
        assert np.abs(exact - _pil_resized_crop(path, box, 224)).max() <= 1


def test_pngs_cmyk_jpegs_and_no_region_decoder_fall_back_to_pil(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rgb = make_photo(np.random.default_rng(2), 160, 120)
    png = tmp_path / "a.png"
    Image.fromarray(rgb).save(png)
    cmyk = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG", quality=95)
    jpeg = _jpeg(tmp_path / "j.jpg", rgb, quality=90)
    box = (10, 20, 100, 90)
    for path in (png, cmyk):
        assert not dec.read_encoded(str(path)).jpeg
    for path in (png, cmyk, jpeg):
        expected = _pil_resized_crop(path, box, 64)
        got = dec.decode_resized_crop(dec.read_encoded(str(path)), box, (64, 64)).numpy()
        assert np.abs(got - expected).max() <= 1, path.name
    monkeypatch.setattr(dec, "_library", lambda: None)
    img = dec.read_encoded(str(jpeg))
    assert img.jpeg and np.abs(dec.decode_resized_crop(img, box, (64, 64)).numpy() - expected).max() <= 1


def test_corrupt_and_truncated_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match=r"bad\.jpg"):
        dec.read_encoded(str(bad))
    data = _jpeg(tmp_path / "t.jpg", make_photo(np.random.default_rng(3), 200, 150)).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg"):
        dec.decode_resized_crop(dec.read_encoded(str(cut)), (0, 0, 150, 200), (32, 32))


# ---------------------------------------------------------------------------------- the device half
def test_device_augment_is_torchvisions_tensor_flip_and_jitter_and_close_to_pils() -> None:
    """Equal to torchvision's tensor ``ColorJitter`` (float arithmetic) to 1e-5; PIL's truncates every op's
    result to uint8 (about half a level darker per op) and the contrast mean to an integer: within 4 levels
    per pixel, under 2 on average."""
    rng = np.random.default_rng(4)
    pictures = [make_photo(rng, 48, 40) for _ in range(6)]
    torch.manual_seed(0)
    jitter = T.ColorJitter(0.4, 0.4, 0.4)
    params, tensor_ref, pil_ref = [], [], []
    for pic in pictures:
        flipped = bool(torch.rand(1) < 0.5)
        order, b, c, s, _ = T.ColorJitter.get_params(
            jitter.brightness, jitter.contrast, jitter.saturation, None
        )
        params.append([float(flipped), b, c, s, *[o for o in order.tolist() if o != 3]])
        x, img = TF.to_tensor(pic), Image.fromarray(pic)
        if flipped:
            x, img = TF.hflip(x), TF.hflip(img)
        for o in order.tolist():
            fn = {0: (TF.adjust_brightness, b), 1: (TF.adjust_contrast, c), 2: (TF.adjust_saturation, s)}.get(
                o
            )
            if fn is not None:
                x, img = fn[0](x, fn[1]), fn[0](img, fn[1])
        tensor_ref.append(TF.normalize(x, MEAN, STD))
        pil_ref.append(TF.to_tensor(img))
    out = DeviceAugment(MEAN, STD)([torch.from_numpy(np.stack(pictures)), torch.tensor(params)])
    assert out.shape == (6, 3, 40, 48) and out.is_contiguous()
    torch.testing.assert_close(out, torch.stack(tensor_ref), atol=1e-5, rtol=0)
    levels = (torch.stack([_unit(o) for o in out]) - torch.stack(pil_ref)).abs() * 255
    assert levels.max() <= 4 and levels.mean() < 2


# --------------------------------------------------------------------------- same augmentation
def test_split_gives_each_sample_the_originals_crop_flip_and_jitter(photos: Path) -> None:
    """Same seed, same sample: the original's output and split's differ by the decoding and jitter
    arithmetic only (a few levels); a wrong crop, flip or jitter factor would differ by far more."""
    train_ds, val_ds, _ = build_datasets("imagenet", root=photos)
    pipe = build_pipeline("split", train_ds, val_ds, CPU)
    original, split = SeededDataset(train_ds, seed=3), SeededDataset(pipe.train, seed=3)
    for epoch in (0, 1):
        original.set_epoch(epoch)
        split.set_epoch(epoch)
        for i in range(len(train_ds)):
            (pixels, params), label = split[i]
            ours = _unit(pipe.train_batch([pixels[None], params[None]], CPU)[0])
            theirs = _unit(original[i][0])
            assert label == train_ds.targets[i]
            diff = (ours - theirs).abs().mean() * 255
            assert diff < 2.5, (epoch, i, float(diff))
            assert (ours.flip(-1) - theirs).abs().mean() * 255 > 4 * diff  # the flip is the same


def test_split_validation_is_the_originals_exactly(photos: Path, tmp_path: Path) -> None:
    png = tmp_path / "val" / "c0" / "x.png"
    png.parent.mkdir(parents=True)
    Image.fromarray(make_photo(np.random.default_rng(5), 300, 400)).save(png)
    (tmp_path / "train" / "c0").mkdir(parents=True)
    Image.open(png).save(tmp_path / "train" / "c0" / "y.png")
    for root in (photos, tmp_path):
        train_ds, val_ds, _ = build_datasets("imagenet", root=root, num_classes=None)
        pipe = build_pipeline("split", train_ds, val_ds, CPU)
        for i in range(len(val_ds)):
            pixels, label = pipe.val[i]
            assert label == val_ds[i][1] and pixels.dtype == torch.uint8 and pixels.shape == (224, 224, 3)
            assert torch.equal(pipe.val_batch(pixels[None], CPU)[0], val_ds[i][0])


def _gradient_tree(root: Path) -> Path:
    """One 256 x 192 picture whose red channel is x and green channel is y (scaled to 0-255)."""
    x = np.arange(256, dtype=np.float64)
    y = np.arange(192, dtype=np.float64) * 255 / 191
    pic = (
        np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.full((1, 1), 128.0)), -1)
        .round()
        .astype(np.uint8)
    )
    for split in ("train", "val"):
        _jpeg(root / split / "c0" / "g.jpg", pic, quality=100, subsampling=0)
    return root


def _geometry(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area fraction, aspect ratio and flip of crops of the gradient picture (``N x 3 x S x S`` in [0, 1])."""
    r, g = images[:, 0] * 255, images[:, 1] * 255 * 191 / 255
    left, right = r[:, :, 0].mean(1), r[:, :, -1].mean(1)
    top, bottom = g[:, 0, :].mean(1), g[:, -1, :].mean(1)
    size = images.shape[-1]
    w = (right - left).abs() * size / (size - 1)  # the columns' centres span (S - 1) / S of the crop
    h = (bottom - top) * size / (size - 1)
    return (w * h / (256 * 192)).numpy(), (w / h).numpy(), (right < left).numpy()


def test_crop_area_aspect_and_flip_distributions_match_the_originals(tmp_path: Path) -> None:
    """Independent draws (different seeds) of 1,500 crops each, measured on the outputs (no jitter): the
    two-sample Kolmogorov-Smirnov distance between split's and the original's crop area fractions and
    aspect ratios stays under 0.06 (critical value at p = 0.01: 0.059), their medians (area, log aspect)
    within 0.03 (about 4 standard errors), and both
    flip rates within 0.5 +- 0.045 (3.5 sigma)."""
    root = _gradient_tree(tmp_path)
    train_ds, val_ds, _ = build_datasets("imagefolder", root=root, image_size=32, augment="imagenet",
                                         color_jitter=0, mean=(0.0,) * 3, std=(1.0,) * 3)  # fmt: skip
    pipe = build_pipeline("split", train_ds, val_ds, CPU)
    n = 1500
    outputs = torch.stack([x for x, _ in _epochs(SeededDataset(train_ds, seed=1), n)])
    split = torch.utils.data.default_collate([x for x, _ in _epochs(SeededDataset(pipe.train, seed=2), n)])
    ours = pipe.train_batch(split, CPU)
    (a0, r0, f0), (a1, r1, f1) = _geometry(outputs), _geometry(ours)
    for theirs, mine in ((a0, a1), (np.log(r0), np.log(r1))):
        assert stats.ks_2samp(theirs, mine).statistic < 0.06
        assert abs(np.median(mine) - np.median(theirs)) < 0.03  # ~4 standard errors of the difference
    assert a1.min() > 0.04 and a1.max() < 1.02 and r1.min() > 0.7 and r1.max() < 1.4  # 8-100%, 3/4 to 4/3
    for flips in (f0, f1):
        assert abs(flips.mean() - 0.5) < 0.045


def _epochs(ds: SeededDataset, n: int) -> list[Any]:
    """Sample 0 in epochs 0..n-1: ``n`` independent draws on the one picture."""
    out = []
    for epoch in range(n):
        ds.set_epoch(epoch)
        out.append(ds[0])
    return out


def test_jitter_factors_and_orders_are_distributed_as_colorjitters(photos: Path) -> None:
    """2,000 draws each, different seeds: each factor's KS distance to the original's draws < 0.06; the six
    orders of the three ops each within 1/6 +- 0.035 (4.5 sigma)."""
    train_ds, val_ds, _ = build_datasets("imagenet", root=photos)
    recipe = build_pipeline("split", train_ds, val_ds, CPU).train.recipe
    cj = T.ColorJitter(0.4, 0.4, 0.4)
    torch.manual_seed(1)
    theirs = np.array(
        [T.ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation, None)[1:4] for _ in range(2000)]
    )
    torch.manual_seed(2)
    ours = torch.stack([recipe.draw() for _ in range(2000)]).numpy()
    for k in range(3):
        assert stats.ks_2samp(theirs[:, k], ours[:, 1 + k]).statistic < 0.06
        assert ours[:, 1 + k].min() >= 0.6 and ours[:, 1 + k].max() <= 1.4
    _, counts = np.unique(ours[:, 4:7], axis=0, return_counts=True)
    assert len(counts) == 6 and np.all(np.abs(counts / 2000 - 1 / 6) < 0.035)
    assert abs(ours[:, 0].mean() - 0.5) < 0.04


# ------------------------------------------------------------------------------ loaders, backends
def test_split_batches_do_not_depend_on_the_number_of_workers_or_a_resume(photos: Path) -> None:
    train_ds, val_ds, _ = build_datasets("imagenet", root=photos, image_size=64)
    pipe = build_pipeline("split", train_ds, val_ds, CPU)
    runs = {}
    for workers, skip in ((0, 0), (2, 0), (2, 4)):
        tl, vl, sampler = build_loaders(pipe.train, pipe.val, batch_size=4, num_workers=workers, seed=7)
        tl, vl = pipe.wrap(tl, vl, CPU)
        assert isinstance(tl, DeviceLoader) and len(tl) == 2 and tl.batch_size == 4
        sampler.set_epoch(1, skip)
        tl.dataset.set_epoch(1)
        runs[(workers, skip)] = [x for x, _ in tl] + [x for x, _ in vl]
    assert all(torch.equal(a, b) for a, b in zip(runs[(0, 0)], runs[(2, 0)], strict=True))
    assert torch.equal(runs[(2, 4)][0], runs[(0, 0)][1])  # resumed after the first batch of 4


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_gpu_decodes_device_half_on_the_cpu_matches_split(photos: Path) -> None:
    """``gpu_decode``'s worker and device halves, run with device = CPU (torchvision's CPU ``decode_jpeg``,
    ``F.interpolate``): the same crops, flips and factors as split, pixels within a few levels."""
    train_ds, val_ds, _ = build_datasets("imagenet", root=photos, image_size=96)
    split = build_pipeline("split", train_ds, val_ds, CPU)
    assert isinstance(split.train, SplitFolder)
    encoded = EncodedFolder(train_ds, split.train.recipe)
    n = len(train_ds)
    batch = torch.utils.data.default_collate([SeededDataset(encoded, 0)[i] for i in range(n)])
    datas, boxes, _ = batch[0]
    assert isinstance(datas[0], bytes) and boxes.shape == (n, 4)
    ours = DeviceDecode((96, 96), DeviceAugment(MEAN, STD))(batch[0], CPU)
    reference = split.train_batch(
        torch.utils.data.default_collate([SeededDataset(split.train, 0)[i] for i in range(n)])[0], CPU
    )
    levels = (ours - reference).abs() * 0.226 * 255  # back to 0-255 levels (std ~0.226)
    assert levels.mean() < 2.5


def test_choosing_a_pipeline_and_what_is_missing_says_so(
    photos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train_ds, val_ds, _ = build_datasets("imagenet", root=photos)
    caplog.set_level(logging.INFO)
    assert build_pipeline(None, train_ds, val_ds, CPU).name == "pil"
    assert "data.pipeline=auto on CPU: pil" in caplog.text
    cuda = torch.device("cuda")  # resolve_pipeline reads the device type only
    assert resolve_pipeline("auto", cuda, train_ds)[0] in ("split", "dali")
    with pytest.raises(
        ValueError,
        match=r"decodes on a CUDA device and this run's device is cpu\. Available here: pil, split",
    ):
        build_pipeline("gpu_decode", train_ds, val_ds, CPU)
    if resolve_pipeline("auto", cuda, train_ds)[0] == "split":
        with pytest.raises(
            ValueError, match=r"needs NVIDIA DALI, which is not installed \(pip install nvidia-dali"
        ):
            build_pipeline("dali", train_ds, val_ds, CPU)
    with pytest.raises(
        ValueError, match=r"unknown input pipeline 'ffcv' \(data.pipeline\); valid choices: pil, split"
    ):
        build_pipeline("ffcv", train_ds, val_ds, CPU)
    digits = build_datasets("mnist5k")
    with pytest.raises(ValueError, match="reads image files: it runs on imagenet and imagefolder"):
        build_pipeline("split", digits[0], digits[1], CPU)
    small = build_datasets("imagenet", root=photos, image_size=32, augment="small")
    with pytest.raises(ValueError, match=r"use data\.pipeline=pil for this augmentation"):
        build_pipeline("split", small[0], small[1], CPU)
    assert resolve_pipeline("auto", cuda, digits[0])[0] == "pil"


def test_training_with_the_split_pipeline(make_cfg, photos: Path, tmp_path: Path) -> None:
    results = train(make_cfg("data=imagenet", f"data.root={photos}", "data.num_classes=2", "data.image_size=64",
                             "data.pipeline=split", "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0",
                             "trainer.epochs=1", "logger=none", "trainer.threads=1", "trainer.kernels=eager",
                             tiny=False))  # fmt: skip
    assert results["data_pipeline"] == "split" and results["global_step"] == 2 and results["val/images"] == 2


def test_bench_loader_writes_numbers_for_the_reference_and_split(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    root = make_photo_tree(tmp_path / "tree", 4, classes=2, size=(120, 90), val=1)
    path = tmp_path / "loader.json"
    bench_loader(
        [
            str(root),
            "--images",
            "4",
            "--batch-size",
            "2",
            "--repeats",
            "1",
            "--workers",
            "0",
            "--json",
            str(path),
        ]
    )
    written = json.loads(path.read_text())
    assert {"reference", "split", "settings"} <= set(written)
    for name in ("reference", "split"):
        assert written[name]["img_per_s"] > 0 and written[name]["img_per_s_per_worker"] > 0
    assert written["split"]["per_worker_vs_reference"] > 0 and written["split"]["device_img_per_s"] > 0
    assert "| split |" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_and_gpu_decode_on_cuda_match_the_cpu(photos: Path) -> None:
    cuda = torch.device("cuda")
    train_ds, val_ds, _ = build_datasets("imagenet", root=photos, image_size=64)
    cpu_pipe, split, gpu = (
        build_pipeline(n, train_ds, val_ds, d)
        for n, d in (("split", CPU), ("split", cuda), ("gpu_decode", cuda))
    )
    outs = {}
    for name, pipe, device in (("cpu", cpu_pipe, CPU), ("split", split, cuda), ("gpu_decode", gpu, cuda)):
        tl, vl, _ = build_loaders(
            pipe.train, pipe.val, batch_size=4, num_workers=2, seed=0, pin_memory=device.type == "cuda"
        )
        tl, vl = pipe.wrap(tl, vl, device)
        outs[name] = [x.cpu() for x, _ in tl] + [x.cpu() for x, _ in vl]
    for a, b in zip(outs["cpu"], outs["split"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for a, b in zip(outs["cpu"], outs["gpu_decode"], strict=True):
        assert (a - b).abs().mean() < 0.05
