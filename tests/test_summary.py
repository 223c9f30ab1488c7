"""Model summary: parameter counts by precision, memory, compression, BOPs / FLOPs, table and CLI."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import xnorpp
from xnorpp.model_summary import LayerSummary, ModelSummary, main, summary
from xnorpp.nn import BinaryConv2d


def _block_conv_weights(blocks: tuple[int, ...], widths: tuple[int, ...] = (64, 128, 256, 512)) -> int:
    """3x3 weights of the basic blocks: each block has conv1 (C_in -> C) and conv2 (C -> C)."""
    total, cin = 0, widths[0]
    for n, c in zip(blocks, widths):
        for _ in range(n):
            total += 9 * cin * c + 9 * c * c
            cin = c
    return total


DOWNSAMPLE_WEIGHTS = 64 * 128 + 128 * 256 + 256 * 512  # three 1x1 convs, first block of stages 2-4


def test_hand_counts() -> None:
    # ResNet-18, per stage: 4 * 9*64*64 | 9*64*128 + 3 * 9*128*128 | ... (written out)
    r18 = 4 * 36_864 + (73_728 + 3 * 147_456) + (294_912 + 3 * 589_824) + (1_179_648 + 3 * 2_359_296)
    assert r18 == _block_conv_weights((2, 2, 2, 2)) == 10_985_472
    assert r18 + DOWNSAMPLE_WEIGHTS == 11_157_504
    r34 = 6 * 36_864 + (73_728 + 7 * 147_456) + (294_912 + 11 * 589_824) + (1_179_648 + 5 * 2_359_296)
    assert r34 == _block_conv_weights((3, 4, 6, 3)) == 21_086_208


@pytest.mark.parametrize(
    ("name", "blocks"), [("resnet18_preact_bin", (2, 2, 2, 2)), ("resnet34_preact_bin", (3, 4, 6, 3))]
)
@pytest.mark.parametrize("variant", ["fp", "weight_only", "full_binary", "real_downsample"])
def test_binary_weight_counts_of_the_resnets(name: str, blocks: tuple[int, ...], variant: str) -> None:
    model = timm.create_model(
        name, binarization=variant, scale="rank1", num_classes=10, input_size=16, stem="small"
    )
    s = summary(model, 16)
    expected = {
        "fp": 0,
        "weight_only": _block_conv_weights(blocks),
        "full_binary": _block_conv_weights(blocks) + DOWNSAMPLE_WEIGHTS,
        "real_downsample": _block_conv_weights(blocks),
    }[variant]
    assert s.params_binary == expected
    assert s.params_total == s.params_binary + s.params_real == sum(p.numel() for p in model.parameters())
    assert s.memory_bytes == s.params_binary / 8 + 4 * s.params_real
    assert s.memory_fp32_bytes == 4 * s.params_total
    n_block = 2 * sum(blocks)  # binary 3x3 convs; 3 downsample convs on top in full_binary
    weight_bits = {"fp": 0, "weight_only": n_block, "full_binary": n_block + 3, "real_downsample": n_block}
    assert sum(layer.weight_bits == 1 for layer in s.layers) == weight_bits[variant]
    binary_ops = {"fp": 0, "weight_only": 0, "full_binary": n_block + 3, "real_downsample": n_block}
    assert sum(layer.bops > 0 for layer in s.layers) == binary_ops[variant]
    assert (s.bops == 0) == (variant in ("fp", "weight_only"))


def _conv(weights: bool, inputs: bool, **kwargs: object) -> BinaryConv2d:
    args = {"stride": 2, "padding": 1, "groups": 2, "scale": "channel", **kwargs}
    return BinaryConv2d(4, 6, 3, binarize_weights=weights, binarize_inputs=inputs, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("weights", "inputs", "binary_ops"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
)
def test_ops_of_one_binary_conv_by_hand(weights: bool, inputs: bool, binary_ops: bool) -> None:
    # 9x9 input, k=3, s=2, p=1 -> 5x5 output; MACs = C_in/groups*kh*kw * C_out * H_out*W_out = 2*9 * 6 * 25
    macs = 2 * 9 * 6 * 5 * 5
    assert macs == 2700
    s = summary(_conv(weights, inputs), 9, in_chans=4)
    (layer,) = s.layers
    assert layer.output_shape == (6, 5, 5)
    assert (layer.weight_bits, layer.input_bits) == (1 if weights else 32, 1 if inputs else 32)
    assert (s.bops, s.flops) == ((macs, 0) if binary_ops else (0, macs))
    assert s.ops == s.flops + s.bops / 64
    # parameters: 6*2*3*3 = 108 weights, 6 scale factors, 6 biases
    assert (s.params_binary, s.params_real) == ((108, 12) if weights else (0, 120))
    assert s.memory_bytes == (108 / 8 + 12 * 4 if weights else 120 * 4)


def test_compression_of_a_tiny_model_by_hand() -> None:
    model = nn.Sequential(
        BinaryConv2d(2, 8, 3, padding=1, bias=False, scale="rank1", output_size=(4, 4)),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )
    s = summary(model, (2, 4, 4))
    binary = 8 * 2 * 3 * 3  # 144 latent weights, 1 bit each: 18 bytes
    real = (8 + 4 + 4) + (8 + 8) + (128 * 3 + 3)  # rank1 scale + BN affine + fc = 419
    assert (s.params_binary, s.params_real, s.params_total) == (binary, real, 563)
    assert s.memory_bytes == 18 + 4 * 419 == 1694
    assert s.memory_fp32_bytes == 4 * 563 == 2252
    assert s.compression == pytest.approx(2252 / 1694)
    assert s.bops == 144 * 16  # every weight used at each of the 4x4 outputs
    assert s.flops == 128 * 3
    assert s.ops == 384 + 2304 / 64 == 420
    assert [layer.name for layer in s.layers] == ["0", "1", "3"]
    assert [layer.type for layer in s.layers] == ["BinaryConv2d", "BatchNorm2d", "Linear"]
    assert s.layers[1].flops == s.layers[1].bops == 0  # BN is not counted (foldable)
    assert s.layers[2].output_shape == (3,)


def test_shared_layer_counts_parameters_once_and_ops_per_call() -> None:
    fc = nn.Linear(5, 5)
    s = summary(nn.Sequential(fc, nn.ReLU(), fc), (1, 1, 5))
    assert s.params_real == 30 and len(s.layers) == 1
    assert s.flops == 2 * 25


def test_resnet18_imagenet_ops() -> None:
    model = timm.create_model(
        "resnet18_preact_bin", binarization="full_binary", scale="rank1", input_size=224
    )
    s = summary(model, 224)
    stem = 3 * 7 * 7 * 64 * 112 * 112
    fc = 512 * 1000
    assert s.flops == stem + fc
    # every 3x3 block conv at its output resolution (56, 28, 14, 7) + the 1x1 downsample convs
    block = (4 * 36_864 * 56**2) + (73_728 + 3 * 147_456) * 28**2 + (294_912 + 3 * 589_824) * 14**2
    block += (1_179_648 + 3 * 2_359_296) * 7**2
    down = 64 * 128 * 28**2 + 128 * 256 * 14**2 + 256 * 512 * 7**2
    assert s.bops == block + down
    assert s.ops == s.flops + s.bops / 64
    real_ds = summary(
        timm.create_model("resnet18_preact_bin", binarization="real_downsample", input_size=224), 224
    )
    assert (real_ds.bops, real_ds.flops) == (block, stem + fc + down)


def test_training_flags_are_restored() -> None:
    model = timm.create_model(
        "resnet18_preact_bin", num_classes=10, input_size=16, stem="small", widths=(8, 8, 8, 8)
    )
    model.train()
    model.layer2.eval()  # a frozen part stays frozen
    before = {name: m.training for name, m in model.named_modules()}
    summary(model, 16)
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    summary(model, 16)
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    summary(model, 16)
    assert torch.equal(torch.rand(3), expected)  # the global RNG stream is untouched


def test_failed_forward_restores_flags_and_removes_hooks() -> None:
    model = timm.create_model(
        "resnet18_preact_bin", scale="rank1", num_classes=10, input_size=16, widths=(8, 8, 8, 8)
    )
    with pytest.raises(ValueError, match="16x16"):
        summary(model, 32)
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())


def test_table_dict_and_rows() -> None:
    model = timm.create_model(
        "resnet18_preact_bin", binarization="full_binary", num_classes=10, input_size=16, stem="small"
    )
    s = summary(model, 16)
    assert isinstance(s, ModelSummary) and all(isinstance(layer, LayerSummary) for layer in s.layers)
    text = s.table()
    assert "11,157,504" in text and "11.2M" in text
    assert f"{s.params_real:,}" in text
    assert f"{s.compression:.2f}x" in text
    assert "layer4.1.conv2" in text and "BinaryConv2d" in text
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["params_binary"] == 11_157_504 and d["ops"] == s.ops and d["compression"] == s.compression
    rows = s.rows()
    assert len(rows) == len(s.layers) and json.loads(json.dumps(rows)) == rows
    conv = next(r for r in rows if r["name"] == "layer1.0.conv1")
    assert conv["params_binary"] == 36_864 and conv["weight_bits"] == conv["input_bits"] == 1
    assert conv["output_shape"] == "64x16x16"


def test_input_size_forms() -> None:
    conv = nn.Conv2d(1, 2, 3)
    for size in (6, (6, 6), (1, 6, 6)):
        assert summary(conv, size, in_chans=1 if size != (1, 6, 6) else None).flops == 2 * 9 * 16
    with pytest.raises(ValueError, match="in_chans"):
        summary(conv, (1, 6, 6), in_chans=3)
    assert xnorpp.summary is summary


def test_command_line_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    result = main(
        [
            "--binarization",
            "real_downsample",
            "--scale",
            "channel",
            "--input-size",
            "32",
            "--num-classes",
            "10",
        ]
    )
    out = capsys.readouterr().out
    assert "10,985,472" in out and "layer4.1.conv2" in out and "BOPs" in out
    assert result.params_binary == 10_985_472
