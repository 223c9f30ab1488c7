"""Bit-packed export: round trip to an identical inference model, sizes, CLI and error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from xnorpp.export import (
    ExportReport,
    FrozenXnorScale,
    build_model_from_args,
    export_model,
    load_checkpoint,
    load_export,
    main,
    pack_signs,
    read_export_metadata,
    unpack_signs,
)
from xnorpp.nn import BinaryConv2d, XnorScale

REPO = Path(__file__).resolve().parents[1]


def small_args(binarization: str, scale: str) -> dict[str, Any]:
    return {
        "name": "resnet18_preact_bin", "binarization": binarization, "scale": scale, "num_classes": 10,
        "in_chans": 3, "input_size": 32, "stem": "small", "estimator": "ste",
    }  # fmt: skip


def trained_model(args: dict[str, Any], seed: int = 0) -> nn.Module:
    """The model of ``args`` moved away from init: random latent weights, Gamma factors, BN params and
    running stats, classifier (training steps would only add CPU time)."""
    torch.manual_seed(seed)
    model = build_model_from_args(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale_factor" in name or (name.endswith("weight") and p.dim() == 1):
                p.uniform_(0.5, 1.5)  # Gamma factors and BN gains
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.eval()


@dataclass
class Exported:
    args: dict[str, Any]
    model: nn.Module
    report: ExportReport
    loaded: nn.Module
    x: torch.Tensor
    want: torch.Tensor
    got: torch.Tensor


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Exported]:
    """Export (once per module) a trained small model and reload it; outputs on a fixed batch."""
    cache: dict[tuple[str, str], Exported] = {}

    def get(binarization: str, scale: str) -> Exported:
        if (binarization, scale) not in cache:
            args = small_args(binarization, scale)
            model = trained_model(args)
            path = tmp_path_factory.mktemp("export") / f"{binarization}-{scale}.safetensors"
            report = export_model(model, args, path)
            loaded = load_export(path)
            x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
            with torch.no_grad():
                want, got = model(x), loaded(x)
            cache[binarization, scale] = Exported(args, model, report, loaded, x, want, got)
        return cache[binarization, scale]

    return get


def packed_convs(model: nn.Module) -> dict[str, BinaryConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BinaryConv2d) and m.binarize_weights}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / max(1.0, a.abs().max().item())).item()


def test_pack_signs_bit_order_and_round_trip() -> None:
    # element k of a filter -> bit k % 8 (LSB first) of byte k // 8; +1 -> 1, -1 -> 0; pad bits 0
    w = torch.tensor([[1.0, -1, -1, 1, 1, 1, -1, -1, 1, -1], [-1.0] * 9 + [0.0]])
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert packed.tolist() == [[0b00111001, 0b01], [0, 0b10]]  # sign(0) = +1
    assert torch.equal(unpack_signs(packed, w.shape), torch.where(w >= 0, 1.0, -1.0))
    r = torch.randn(7, 5, 3, 3)
    assert torch.equal(unpack_signs(pack_signs(r), r.shape), torch.where(r >= 0, 1.0, -1.0))
    with pytest.raises(ValueError, match="does not fit"):
        unpack_signs(packed, (3, 10))


VARIANTS = [
    ("full_binary", "rank1"),
    ("full_binary", "channel"),
    ("real_downsample", "rank1"),
    ("real_downsample", "channel"),
    ("full_binary", "xnor_k"),
    ("real_downsample", "xnor"),
]


@pytest.mark.parametrize(("binarization", "scale"), VARIANTS)
def test_round_trip_gives_the_same_outputs(
    binarization: str, scale: str, exported: Callable[[str, str], Exported]
) -> None:
    e = exported(binarization, scale)
    n_packed = 19 if binarization == "full_binary" else 16
    assert len(e.report.packed_layers) == n_packed
    assert e.report.bytes == e.report.path.stat().st_size
    assert e.report.ratio == e.report.bytes / e.report.fp32_bytes
    assert not e.loaded.training
    print(f"{binarization}/{scale}: max abs output diff {(e.want - e.got).abs().max().item():.3g}")
    assert max_rel_diff(e.want, e.got) <= 1e-5

    original, frozen = packed_convs(e.model), packed_convs(e.loaded)
    assert set(original) == set(frozen) == set(e.report.packed_layers)
    for name, conv in frozen.items():
        assert not conv.centre_weights
        assert torch.equal(conv.binary_weight(), original[name].binary_weight())
        assert isinstance(conv.scale_factor, FrozenXnorScale) == (scale in ("xnor", "xnor_k"))
    if binarization == "real_downsample":  # real 1x1 shortcut convs keep their fp32 weights
        real = e.loaded.layer2[0].downsample[1]
        assert not real.binarize_weights
        assert torch.equal(real.weight, e.model.layer2[0].downsample[1].weight)


def test_stored_signs_are_used_verbatim(tmp_path: Path) -> None:
    """Why loaded layers turn centring off: re-centring +-1 signs flips an all -1 tap to +1, and such a
    tap does come out of fp32 rounding of ``W - mean W`` when a tap's latent weights are all equal."""
    args = small_args("full_binary", "channel")
    model = build_model_from_args(args).eval()
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.weight.normal_()
        for v in torch.rand(1000, generator=torch.Generator().manual_seed(0)):
            conv.weight[0, :, 1, 1] = v  # equal latent weights: c = W - mean W is 0 up to rounding
            if (conv.binary_weight()[0, :, 1, 1] < 0).all():
                break
    assert torch.equal(conv.binary_weight()[0, :, 1, 1], -torch.ones(64))
    loaded = load_export(export_model(model, args, tmp_path / "m.safetensors").path)
    frozen = loaded.layer1[0].conv1
    assert torch.equal(frozen.binary_weight(), conv.binary_weight())
    frozen.centre_weights = True  # what loading the signs into an unchanged layer would do
    assert torch.equal(frozen.binary_weight()[0, :, 1, 1], torch.ones(64))


def test_xnor_alpha_is_stored(exported: Callable[[str, str], Exported]) -> None:
    """The analytic alpha = mean|W - mean W| cannot come back from signs: a plain XnorScale on the
    loaded +-1 weights gives alpha = 1 and other outputs."""
    e = exported("real_downsample", "xnor")
    loaded = load_export(e.report.path)  # a fresh copy: the cached one stays intact
    for name, conv in packed_convs(loaded).items():
        source = packed_convs(e.model)[name].scaled_weight_source()
        assert torch.equal(conv.scale_factor.alpha, source.abs().mean(dim=(1, 2, 3)))
        conv.scale_factor = XnorScale()
    with torch.no_grad():
        assert max_rel_diff(e.want, loaded(e.x)) > 1e-2


def test_re_export_of_a_loaded_model_is_identical(
    exported: Callable[[str, str], Exported], tmp_path: Path
) -> None:
    e = exported("full_binary", "xnor_k")
    again = load_export(export_model(e.loaded, e.args, tmp_path / "b.safetensors").path)
    with torch.no_grad():
        assert torch.equal(again(e.x), e.got)


def test_file_layout_and_metadata(exported: Callable[[str, str], Exported]) -> None:
    e = exported("real_downsample", "rank1")
    meta = read_export_metadata(e.report.path)
    assert meta["format"] == "xnorpp-binary-export" and meta["format_version"] == 1
    assert meta["architecture"] == "resnet18_preact_bin" and meta["variant"] == "real_downsample"
    assert meta["scale"] == "rank1" and meta["input_size"] == [32, 32] and meta["num_classes"] == 10
    assert meta["model_args"] == e.args and "LSB first" in meta["bit_order"]
    assert [p["name"] for p in meta["packed"]] == e.report.packed_layers
    with safe_open(str(e.report.path), framework="pt") as f:
        keys = set(f.keys())
        entry = meta["packed"][0]
        assert entry == {"name": "layer1.0.conv1", "key": "layer1.0.conv1.weight_packed",
                         "shape": [64, 64, 3, 3], "scale": "rank1"}  # fmt: skip
        packed = f.get_tensor(entry["key"])
        assert packed.dtype == torch.uint8 and packed.shape == (64, 64 * 9 // 8)
        assert "layer1.0.conv1.weight" not in keys  # no latent weights for packed layers
        assert f.get_tensor("layer2.0.downsample.1.weight").dtype == torch.float32
        assert f.get_tensor("layer1.0.conv1.scale_factor.beta").shape == (1, 32, 1)


def test_resnet18_224_export_size_ratio(tmp_path: Path) -> None:
    """ImageNet ResNet-18 (224x224, 1000 classes, rank1): measured 0.0775 full_binary, 0.0916 real_downsample."""
    ratios = {}
    for binarization in ("full_binary", "real_downsample"):
        args = {"name": "resnet18_preact_bin", "binarization": binarization, "scale": "rank1",
                "num_classes": 1000, "in_chans": 3, "input_size": 224, "stem": "imagenet", "estimator": "ste"}  # fmt: skip
        torch.manual_seed(0)
        model = build_model_from_args(args).eval()
        with torch.no_grad():
            for conv in packed_convs(model).values():
                conv.weight.normal_()
        report = export_model(model, args, tmp_path / f"{binarization}.safetensors")
        ratios[binarization] = report.ratio
        print(f"{binarization}: {report.bytes} B / {report.fp32_bytes} B fp32 = {report.ratio:.4f}")
        if binarization == "full_binary":  # reload once at full size (no forward: outputs are tested at 32)
            loaded = packed_convs(load_export(report.path))
            for name, conv in packed_convs(model).items():
                assert torch.equal(loaded[name].binary_weight(), conv.binary_weight())
    assert 0.07 < ratios["full_binary"] < 0.085
    assert 0.085 < ratios["real_downsample"] < 0.1


def _write_checkpoint(path: Path, model: nn.Module, args: dict[str, Any], **extra: Any) -> None:
    torch.save({"model": model.state_dict(), "model_args": args, "epoch": 3, **extra}, path)


def test_cli_round_trip(
    exported: Callable[[str, str], Exported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    e = exported("real_downsample", "rank1")
    ckpt, out = tmp_path / "last.pt", tmp_path / "model.safetensors"
    _write_checkpoint(ckpt, e.model, e.args)
    assert main([str(ckpt), str(out)]) == 0
    text = capsys.readouterr().out
    assert "16 bit-packed" in text and "fp32 model state" in text and "ratio" in text
    with torch.no_grad():
        assert max_rel_diff(e.want, load_export(out)(e.x)) <= 1e-5


def test_cli_as_module(tmp_path: Path) -> None:
    args = small_args("full_binary", "channel")
    ckpt, out = tmp_path / "c.pt", tmp_path / "c.safetensors"
    _write_checkpoint(ckpt, build_model_from_args(args), args)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "xnorpp.export", str(ckpt), str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "ratio export / fp32" in run.stdout and out.is_file()


def test_checkpoint_with_ddp_prefix(tmp_path: Path) -> None:
    args = small_args("full_binary", "rank1")
    state = {f"module.{k}": v for k, v in build_model_from_args(args).state_dict().items()}
    torch.save({"model": state, "model_args": args}, tmp_path / "ddp.pt")
    loaded_state, loaded_args = load_checkpoint(tmp_path / "ddp.pt")
    assert loaded_args == args and all(not k.startswith("module.") for k in loaded_state)


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_checkpoint(missing)
    assert main([str(missing), str(tmp_path / "o.safetensors")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err

    torch.save({"model": {}}, tmp_path / "no_args.pt")
    with pytest.raises(ValueError, match="'model_args'"):
        load_checkpoint(tmp_path / "no_args.pt")
    torch.save({"state_dict": {}}, tmp_path / "neither.pt")
    with pytest.raises(ValueError, match="'model' / 'model_args'"):
        load_checkpoint(tmp_path / "neither.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")

    with pytest.raises(ValueError, match="'name'"):
        build_model_from_args({"binarization": "full_binary"})

    args = small_args("full_binary", "rank1")
    model = build_model_from_args(args)
    with pytest.raises(ValueError, match="do not describe this model"):
        export_model(model, small_args("real_downsample", "rank1"), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="do not describe this model"):
        export_model(model, {**args, "num_classes": 7}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="JSON"):
        export_model(model, {**args, "input_size": torch.tensor(32)}, tmp_path / "x.safetensors")

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an xnorpp export"):
        load_export(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_export(tmp_path / "missing.safetensors")
    meta_path = tmp_path / "future.safetensors"
    future = {"format": "xnorpp-binary-export", "format_version": 99}
    save_file({"w": torch.zeros(2)}, str(meta_path), metadata={"xnorpp": json.dumps(future)})
    with pytest.raises(ValueError, match="version 99"):
        read_export_metadata(meta_path)


@pytest.mark.parametrize("model", ["timm_resnet18", "resnet34_preact"])
def test_every_trainable_model_exports_from_its_training_checkpoint(
    make_cfg: Callable[..., Any], model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The models train.py trains (resnet18_preact elsewhere here): checkpoint -> CLI export -> same outputs."""
    from xnorpp.engine.checkpoint import load_checkpoint as load_training_checkpoint
    from xnorpp.run import build_model, train

    train(make_cfg(f"model={model}", out=tmp_path / "run"))
    ckpt = load_training_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    out = tmp_path / "model.safetensors"
    assert main([str(tmp_path / "run" / "checkpoints" / "last.pt"), str(out)]) == 0, capsys.readouterr().err
    trained = build_model(ckpt["model_args"])
    trained.load_state_dict(ckpt["model"])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(trained.eval()(x), load_export(out)(x))
    meta = read_export_metadata(out)
    want = ("fp", "none") if model == "timm_resnet18" else ("real_downsample", "rank1")
    assert (meta["architecture"], meta["variant"], meta["scale"]) == (ckpt["model_args"]["name"], *want)
