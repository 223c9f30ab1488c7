"""Binary pre-activation ResNets: timm registration, variants, block structure, errors."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import Tensor, nn

import xnorpp
from xnorpp.models import BINARIZATIONS, STEMS, PreActBinaryResNet
from xnorpp.nn import SCALES, BinaryConv2d

BLOCK_CONV = re.compile(r"^layer[1-4]\.\d+\.conv[12]$")
DOWNSAMPLE_CONV = re.compile(r"^layer[2-4]\.0\.downsample\.1$")


NARROW = (8, 16, 32, 64)  # stage widths of the fast test models; the layout is width-independent


def _small(name: str = "resnet18_preact_bin", **kwargs: object) -> PreActBinaryResNet:
    """A narrow model on 16x16 images (small stem: stages at 16, 8, 4, 2), 10 classes."""
    args = {"num_classes": 10, "input_size": 16, "stem": "small", "widths": NARROW, **kwargs}
    return timm.create_model(name, **args)


def test_issue_example_creates_trains_and_backprops() -> None:
    assert xnorpp.models.resnet18_preact_bin is timm.models.model_entrypoint("resnet18_preact_bin")
    model = timm.create_model(
        "resnet18_preact_bin", binarization="real_downsample", scale="rank1", num_classes=10, input_size=32
    )
    assert isinstance(model, PreActBinaryResNet)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18_preact_bin", "resnet34_preact_bin"])
def test_both_models_are_registered_with_timm(name: str) -> None:
    assert name in timm.list_models("resnet*_preact_bin")
    model = _small(
        name, binarization="full_binary", scale="channel", widths=(64, 128, 256, 512), input_size=8
    )
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.get_classifier() is model.fc and model.num_features == 512


def test_resnet34_has_3_4_6_3_blocks() -> None:
    model = timm.create_model("resnet34_preact_bin", binarization="fp")
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 6, 3]


# ---------------------------------------------------------------- which layers are binary


def _convs(model: nn.Module) -> tuple[list[BinaryConv2d], list[BinaryConv2d]]:
    named = dict(model.named_modules())
    block = [m for n, m in named.items() if BLOCK_CONV.match(n)]
    down = [m for n, m in named.items() if DOWNSAMPLE_CONV.match(n)]
    return block, down


@pytest.mark.parametrize("variant", list(BINARIZATIONS))
def test_binary_layers_of_each_variant(variant: str) -> None:
    model = _small(binarization=variant, scale="rank1")
    block, down = _convs(model)
    assert len(block) == 16 and len(down) == 3
    assert all(isinstance(m, BinaryConv2d) for m in block + down)
    flags = {"block": {(m.binarize_weights, m.binarize_inputs) for m in block}}
    flags["down"] = {(m.binarize_weights, m.binarize_inputs) for m in down}
    expected = {
        "fp": ({(False, False)}, {(False, False)}),
        "weight_only": ({(True, False)}, {(False, False)}),
        "full_binary": ({(True, True)}, {(True, True)}),
        "real_downsample": ({(True, True)}, {(False, False)}),
        "activation_only": ({(False, True)}, {(False, False)}),
    }[variant]
    assert (flags["block"], flags["down"]) == expected
    # the stem conv and the classifier are plain real layers in every variant
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    binary_names = {n for n, m in model.named_modules() if isinstance(m, BinaryConv2d) and m.is_binary}
    assert {n for n, _ in model.binary_convs} == binary_names
    assert all(BLOCK_CONV.match(n) or DOWNSAMPLE_CONV.match(n) for n in binary_names)
    # real convs carry no scale factor; binary ones carry the requested one
    for m in block + down:
        assert m.scale == ("rank1" if m.is_binary else "none")
    if variant == "fp":
        assert model.scale == "none" and not any(
            isinstance(m, BinaryConv2d) and m.is_binary for m in model.modules()
        )


# ---------------------------------------------------------------- structure (docs/method.md)


def test_stem_and_head_structure() -> None:
    model = timm.create_model("resnet18_preact_bin", num_classes=10, input_size=64)
    c = model.conv1
    assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) == (
        3,
        64,
        (7, 7),
        (2, 2),
        (3, 3),
    )
    assert c.bias is None and isinstance(model.bn1, nn.BatchNorm2d)
    assert isinstance(model.maxpool, nn.MaxPool2d) and (model.maxpool.kernel_size, model.maxpool.stride) == (
        3,
        2,
    )
    assert (model.fc.in_features, model.fc.out_features) == (512, 10) and model.fc.bias is not None
    assert [m.conv1.stride for m in (model.layer1[0], model.layer2[0], model.layer3[0], model.layer4[0])] == [
        (1, 1),
        (2, 2),
        (2, 2),
        (2, 2),
    ]
    widths = [s[0].conv2.out_channels for s in (model.layer1, model.layer2, model.layer3, model.layer4)]
    assert widths == [64, 128, 256, 512]


def test_downsample_is_avgpool_then_1x1_conv_then_bn() -> None:
    model = timm.create_model("resnet18_preact_bin", binarization="full_binary", scale="rank1")
    for stage, cin, cout in ((model.layer2, 64, 128), (model.layer3, 128, 256), (model.layer4, 256, 512)):
        pool, conv, bn = stage[0].downsample
        assert isinstance(pool, nn.AvgPool2d) and (pool.kernel_size, pool.stride) == (2, 2)
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (
            cin,
            cout,
            (1, 1),
            (1, 1),
        )
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == cout
        assert stage[0].conv1.stride == (2, 2)
        assert stage[1].downsample is None
    assert all(b.downsample is None for b in model.layer1)


@pytest.mark.parametrize("variant", ["fp", "full_binary"])
def test_block_dataflow_matches_reference(variant: str) -> None:
    """identity = x; h = BN1(x); identity = ds(h); h = BN3(conv2(BN2(ReLU(conv1(h))))); ReLU(h + identity)."""
    torch.manual_seed(0)
    model = _small(binarization=variant, scale="rank1").eval()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    seen: dict[str, Tensor] = {}

    def record(key: str, module: nn.Module) -> None:
        module.register_forward_pre_hook(lambda _m, args: seen.__setitem__(f"{key}:in", args[0].clone()))
        module.register_forward_hook(lambda _m, _a, out: seen.__setitem__(f"{key}:out", out.clone()))

    for name in ("layer1.1", "layer3.0"):
        block = model.get_submodule(name)
        record(name, block)
        for part in ("bn1", "conv1", "bn2", "conv2", "bn3"):
            record(f"{name}.{part}", getattr(block, part))
        if block.downsample is not None:
            record(f"{name}.ds", block.downsample)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))

    for name in ("layer1.1", "layer3.0"):
        s = {k.removeprefix(name): v for k, v in seen.items() if k.startswith(name)}
        assert torch.equal(s[".bn1:in"], s[":in"])
        assert torch.equal(s[".conv1:in"], s[".bn1:out"])
        assert torch.equal(s[".bn2:in"], torch.relu(s[".conv1:out"]))
        assert torch.equal(s[".conv2:in"], s[".bn2:out"])
        assert torch.equal(s[".bn3:in"], s[".conv2:out"])
        identity = s[":in"]
        if name == "layer3.0":  # the shortcut sees the normalised input bn1(x), not x
            assert torch.equal(s[".ds:in"], s[".bn1:out"])
            identity = s[".ds:out"]
        assert torch.allclose(s[":out"], torch.relu(s[".bn3:out"] + identity))


@pytest.mark.parametrize("variant", ["fp", "full_binary"])
def test_no_dead_parameters_or_modules(variant: str) -> None:
    torch.manual_seed(1)
    model = _small(binarization=variant, scale="rank1").train()
    called: set[str] = set()
    for name, m in model.named_modules():
        if list(m.parameters(recurse=False)):
            m.register_forward_hook(lambda _m, _a, _o, name=name: called.add(name))
    out = model(torch.randn(4, 3, 16, 16))
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    with_params = {n for n, m in model.named_modules() if list(m.parameters(recurse=False))}
    # a module counts as used when it or its parent layer ran (a conv may read its scale's parameters)
    unused = {n for n in with_params if not any(n == c or n.startswith(f"{c}.") for c in called)}
    assert not unused
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 1 + 8 * 3 + 3  # stem, three per block, one per downsample
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


# ---------------------------------------------------------------- errors and input sizes


@pytest.mark.parametrize(
    ("kwarg", "valid"),
    [("binarization", list(BINARIZATIONS)), ("scale", list(SCALES)), ("stem", list(STEMS))],
)
def test_bad_names_list_valid_choices(kwarg: str, valid: list[str]) -> None:
    with pytest.raises(ValueError, match="bogus") as err:
        timm.create_model("resnet18_preact_bin", num_classes=10, input_size=32, **{kwarg: "bogus"})
    assert all(v in str(err.value) for v in valid)


def test_wrong_input_size_with_rank1_names_both_sizes() -> None:
    model = timm.create_model("resnet18_preact_bin", scale="rank1", num_classes=10, input_size=32)
    with pytest.raises(ValueError, match="32x32") as err:
        model(torch.randn(1, 3, 64, 48))
    assert "64x48" in str(err.value)


@pytest.mark.parametrize("scale", ["channel", "rank1"])
@pytest.mark.parametrize(
    ("stem", "size", "final"), [("small", 28, (4, 4)), ("imagenet", 36, (2, 2)), ("small", (15, 22), (2, 3))]
)
def test_odd_input_sizes_work(
    scale: str, stem: str, size: int | tuple[int, int], final: tuple[int, int]
) -> None:
    model = _small(binarization="full_binary", scale=scale, stem=stem, input_size=size).eval()
    hw = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        assert model(torch.randn(1, 3, *hw)).shape == (1, 10)
        assert model.forward_features(torch.randn(1, 3, *hw)).shape == (1, NARROW[-1], *final)
    assert model.final_size == final


def test_channel_scale_accepts_any_input_size() -> None:
    model = _small(scale="channel", input_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 20, 24)).shape == (1, 10)


def test_pretrained_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("resnet18_preact_bin", pretrained=True, num_classes=10, input_size=32)


@pytest.mark.parametrize("variant", ["fp", "real_downsample"])
def test_real_convs_start_as_the_original_kaiming_fan_in(variant: str) -> None:
    """The original initialises real convs with ``kaiming_normal_`` defaults: fan_in, std sqrt(2 / fan_in)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18_preact_bin", binarization=variant, num_classes=10, input_size=224)
    assert float(model.conv1.weight.std()) == pytest.approx((2 / (3 * 49)) ** 0.5, rel=0.03)  # 0.1166
    down = model.layer3[0].downsample[1]  # real 1x1 conv, 128 -> 256
    assert float(down.weight.std()) == pytest.approx((2 / 128) ** 0.5, rel=0.03)
    block = model.layer2[1].conv1
    if variant == "fp":  # a real block conv, 128 x 3 x 3 inputs
        assert float(block.weight.std()) == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.03)
    else:  # binary latent weights: uniform [0, 1e-3)
        assert float(block.weight.min()) >= 0 and float(block.weight.max()) < 1e-3
