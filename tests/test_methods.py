"""The methods after XNOR-Net++: larq-style quantizers, the magnitude-aware scale, Bi-Real and ReActNet blocks."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import xnorpp
from xnorpp.models import BLOCKS, BiRealBlock, ReActBlock, get_binarization
from xnorpp.nn import (
    ACTIVATION_ESTIMATORS,
    QUANTIZERS,
    ApproxSign,
    BinaryConv2d,
    MagnitudeAwareSign,
    SteSign,
    SwishSign,
    magnitude_aware_sign,
    swish_sign,
)


def _grad(fn, x: list[float]) -> Tensor:
    t = torch.tensor(x, requires_grad=True)
    fn(t).sum().backward()
    return t.grad


# ---------------------------------------------------------------- quantizers: values and gradients


def test_swish_sign_forward_and_signswish_gradient_by_hand() -> None:
    x = [-0.5, 0.0, 0.2, 1.0]
    assert torch.equal(swish_sign(torch.tensor(x)), torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    for beta in (5.0, 2.0):
        want = [beta * (2 - beta * v * math.tanh(beta * v / 2)) / (1 + math.cosh(beta * v)) for v in x]
        assert torch.allclose(_grad(lambda t, b=beta: swish_sign(t, b), x), torch.tensor(want), atol=1e-6)
    assert _grad(swish_sign, [0.0]).item() == pytest.approx(5.0)  # beta at 0
    assert torch.isfinite(_grad(swish_sign, [100.0, -100.0])).all()  # no overflow of cosh


def test_magnitude_aware_sign_scales_sign_and_gradient_by_mean_abs() -> None:
    w = torch.tensor([[0.5, -1.5, 0.1], [-0.2, 0.2, 0.2]], requires_grad=True)
    y = magnitude_aware_sign(w)
    alpha = torch.tensor([[0.7], [0.2]])
    assert torch.allclose(y, alpha * torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]))
    y.sum().backward()  # gradient alpha where |w| <= 1, none through alpha itself
    assert torch.allclose(w.grad, torch.tensor([[0.7, 0.0, 0.7], [0.2, 0.2, 0.2]]))


def test_ste_sign_clip_value_sets_the_gradient_window() -> None:
    x = [-2.0, -0.5, 0.5, 1.0, 1.5]
    assert torch.equal(_grad(SteSign(), x), torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(_grad(SteSign(0.5), x), torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(_grad(SteSign(None), x), torch.ones(5))
    assert torch.equal(_grad(ApproxSign(), [-0.5, 0.25, 2.0]), torch.tensor([1.0, 1.5, 0.0]))


def test_quantizers_are_named_registered_and_one_bit() -> None:
    assert list(QUANTIZERS) == ["ste_sign", "approx_sign", "swish_sign", "magnitude_aware_sign"]
    for alias, cls in QUANTIZERS.items():
        q = cls()
        assert q.alias == alias and q.precision == 1 and alias in repr(q)
        assert (
            q.estimator is None or q.estimator in ACTIVATION_ESTIMATORS
        )  # the config name of the same gradient
    assert (SteSign().estimator, SteSign(None).estimator, SwishSign().estimator) == (
        "ste",
        "identity",
        "swish_sign",
    )
    with pytest.raises(ValueError, match="valid choices: ste_sign"):
        QUANTIZERS.get("dorefa")


@pytest.mark.parametrize("estimator", ["approx_sign", "swish_sign"])
def test_magnitude_aware_scale_equals_a_conv_of_magnitude_aware_weights(estimator: str) -> None:
    """The per-filter factor on the output gives the magnitude-aware weight's values and gradients."""
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 3, 3, padding=1, bias=False, scale="magnitude_aware", estimator=estimator,
                        centre_weights=False)  # fmt: skip
    with torch.no_grad():
        conv.weight.normal_(0, 0.8)
    w = conv.weight.detach().clone().requires_grad_()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(2, 3, 5, 5)
    (conv(x) * g).sum().backward()
    sign = ACTIVATION_ESTIMATORS[estimator]
    ref = F.conv2d(sign(x2), MagnitudeAwareSign()(w), padding=1)
    (ref * g).sum().backward()
    assert torch.allclose(conv(x), ref, atol=1e-5)
    assert torch.allclose(conv.weight.grad, w.grad, atol=1e-5) and torch.allclose(x.grad, x2.grad, atol=1e-5)


# ---------------------------------------------------------------- blocks


def _block(
    kind: str, variant: str = "full_binary", cin: int = 8, cout: int = 8, stride: int = 1
) -> nn.Module:
    return BLOCKS[kind](cin, cout, stride, (6, 6), get_binarization(variant), "channel", "approx_sign")


def _zero_bn(block: nn.Module) -> None:
    """BN weight and bias 0: every binary branch adds exactly 0."""
    for name, m in block.named_modules():
        if isinstance(m, nn.BatchNorm2d) and "downsample" not in name:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)


def test_bireal_block_puts_a_real_shortcut_around_each_binary_conv() -> None:
    block = _block("bireal").eval()
    _zero_bn(block)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(block(x), x)  # both branches 0: the input passes both shortcuts
    with torch.no_grad():
        block.bn1.bias.fill_(1.0)  # conv1's branch adds 1; conv2's shortcut carries it to the output
    assert torch.allclose(block(x), x + 1)
    assert (
        isinstance(block.conv1, BinaryConv2d)
        and block.conv1.binarize_inputs
        and not block.conv1.centre_weights
    )
    real = _block("bireal", "fp")
    assert isinstance(real.act1, nn.Hardtanh) and not real.conv1.is_binary  # clip where the sign would be


def test_reactnet_block_has_rsign_thresholds_and_rprelu() -> None:
    block = _block("reactnet").eval()
    _zero_bn(block)
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(block(x), F.prelu(F.prelu(x, torch.tensor([0.25])), torch.tensor([0.25])))
    with torch.no_grad():
        block.act1.shift_in.shift.fill_(-0.5)  # RPReLU(x) = PReLU(x + b_in) + b_out
        block.act1.shift_out.shift.fill_(2.0)
    h = F.prelu(x - 0.5, torch.tensor([0.25])) + 2.0
    assert torch.allclose(block(x), F.prelu(h, torch.tensor([0.25])))
    # RSign: the learned threshold moves the sign: x + t is what the conv binarizes
    seen = []
    block.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        block.move1.shift.fill_(0.3)
    block(x)
    assert torch.allclose(seen[0], x + 0.3)
    assert (
        sum(p.numel() for n, p in block.named_parameters() if "shift" in n) == 8 * 6
    )  # 2 RSign + 2 x 2 RPReLU


@pytest.mark.parametrize("kind", ["bireal", "reactnet"])
def test_block_downsample_is_the_shared_avgpool_1x1_shortcut(kind: str) -> None:
    block = _block(kind, "real_downsample", 8, 16, 2)
    pool, conv, _ = block.downsample
    assert isinstance(pool, nn.AvgPool2d) and not conv.is_binary and conv.kernel_size == (1, 1)
    assert block(torch.randn(1, 8, 6, 6)).shape == (1, 16, 3, 3)


@pytest.mark.parametrize("block", ["preact", "bireal", "reactnet"])
def test_every_block_builds_the_resnet18_with_the_same_binary_weights(block: str) -> None:
    model = timm.create_model("resnet18_preact_bin", block=block, binarization="full_binary", scale="rank1",
                              num_classes=10, input_size=32)  # fmt: skip
    assert xnorpp.summary(model, 32).params_binary == 11_157_504  # 16 block convs + 3 downsample convs
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.relu, nn.ReLU) == (block == "preact")  # no ReLU before the first sign
    assert isinstance(
        model.layer1[0], {"preact": nn.Module, "bireal": BiRealBlock, "reactnet": ReActBlock}[block]
    )


def test_uncentred_binary_weights_start_with_mixed_signs() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18_preact_bin", block="bireal", num_classes=10, input_size=32)
    w = model.layer2[1].conv1.binary_weight()
    assert 0.4 < float((w > 0).float().mean()) < 0.6
    with pytest.raises(ValueError, match="valid choices: preact, bireal, reactnet"):
        timm.create_model("resnet18_preact_bin", block="densenet", num_classes=10, input_size=32)
