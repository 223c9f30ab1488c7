"""Binary building blocks: sign estimators, weight binarization, scale factors, BinaryConv2d."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xnorpp.nn import (
    ACTIVATION_ESTIMATORS,
    SCALES,
    BinaryConv2d,
    LearnedScale,
    approx_sign,
    binary_sign,
    build_scale,
    get_estimator,
    identity_sign,
    sign_ste,
    weight_sign,
)

ESTIMATORS: list[Callable[[Tensor], Tensor]] = [sign_ste, approx_sign, identity_sign, binary_sign]


def _grad(fn: Callable[[Tensor], Tensor], x: list[float], upstream: list[float] | None = None) -> Tensor:
    """``d/dx sum(upstream * fn(x))``."""
    t = torch.tensor(x, requires_grad=True)
    g = torch.ones_like(t) if upstream is None else torch.tensor(upstream)
    (fn(t) * g).sum().backward()
    assert t.grad is not None
    return t.grad


# ---------------------------------------------------------------- sign functions: forward


@pytest.mark.parametrize("fn", ESTIMATORS, ids=lambda f: f.__name__)
def test_sign_forward_is_plus_minus_one_with_sign_zero_plus_one(fn: Callable[[Tensor], Tensor]) -> None:
    x = torch.tensor([-3.0, -1.0, -1e-7, -0.0, 0.0, 1e-7, 0.5, 2.0])
    assert torch.equal(fn(x), torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("fn", ESTIMATORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sign_keeps_dtype_and_never_gives_zero(fn: Callable[[Tensor], Tensor], dtype: torch.dtype) -> None:
    x = torch.tensor([[0.0, -2.5], [1e-3, -1e-3]], dtype=dtype)
    y = fn(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=dtype))


def test_weight_sign_forward_is_sign_of_centred_weight() -> None:
    w = torch.tensor([[[[3.0]], [[0.0]], [[0.0]]], [[[0.1]], [[0.3]], [[0.2]]]])  # (2, 3, 1, 1)
    # centred: filter 0 -> [2, -1, -1]; filter 1 -> [-0.1, 0.1, 0.0]
    expected = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0]).view(2, 3, 1, 1)
    assert torch.equal(weight_sign(w), expected)
    assert torch.equal(weight_sign(w, centre=False), torch.ones_like(w))
    w = torch.randn(5, 4, 3, 3)
    assert torch.equal(weight_sign(w), binary_sign(w - w.mean(dim=1, keepdim=True)))


# ---------------------------------------------------------------- sign functions: gradients


def test_sign_ste_gradient_window_is_inclusive() -> None:
    x = [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
    assert torch.equal(_grad(sign_ste, x), torch.tensor([0.0, 1, 1, 1, 1, 1, 0]))
    upstream = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert torch.equal(_grad(sign_ste, x, upstream), torch.tensor([0.0, 2, 3, 4, 5, 6, 0]))
    edges = [-1.0 - 1e-6, -1.0 + 1e-6, 1.0 - 1e-6, 1.0 + 1e-6]
    assert torch.equal(_grad(sign_ste, edges), torch.tensor([0.0, 1, 1, 0]))


def test_approx_sign_gradient_is_two_minus_two_abs_x_inside() -> None:
    x = [-1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
    expected = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0])
    assert torch.allclose(_grad(approx_sign, x), expected)
    upstream = [2.0] * len(x)
    assert torch.allclose(_grad(approx_sign, x, upstream), 2 * expected)


def test_identity_sign_gradient_is_one_everywhere() -> None:
    x = [-100.0, -1.5, -1.0, 0.0, 0.3, 1.0, 7.0]
    assert torch.equal(_grad(identity_sign, x), torch.ones(len(x)))


def test_sign_ste_saves_only_a_bool_mask_for_backward() -> None:
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sign_ste(x)
    assert saved, "sign_ste saved nothing: the backward could not know the window"
    assert all(t.dtype == torch.bool for t in saved), [t.dtype for t in saved]
    assert not any(t is x or t.dtype == x.dtype for t in saved)
    y.sum().backward()
    assert torch.equal(x.grad, (x.abs() <= 1).float())


def test_weight_sign_gradient_through_centring_by_hand() -> None:
    w = torch.tensor(
        [
            [[[3.0, 0.2]], [[0.0, -0.4]], [[0.0, 0.5]]],
            [[[0.1, 1.0]], [[0.3, -2.0]], [[0.2, 0.0]]],
        ],
        requires_grad=True,
    )  # (C_out=2, C_in=3, 1, 2)
    g = torch.arange(1.0, 13.0).view(2, 3, 1, 2)
    (weight_sign(w) * g).sum().backward()

    c = w.detach() - w.detach().mean(dim=1, keepdim=True)
    mask = (c.abs() <= 1).float()
    assert mask[0, 0, 0, 0] == 0  # c = 3 - 1 = 2: outside the window
    assert mask[1, 1, 0, 1] == 0  # c = -2 - (-1/3) = -5/3
    gm = g * mask
    expected = gm - gm.mean(dim=1, keepdim=True)
    assert torch.allclose(w.grad, expected)
    # filter 0, tap 0 written out: g = [1, 3, 5], mask = [0, 1, 1] -> g*mask = [0, 3, 5], mean 8/3
    assert torch.allclose(w.grad[0, :, 0, 0], torch.tensor([-8 / 3, 1 / 3, 7 / 3]))


# ---------------------------------------------------------------- scale factors

C, H_IN, W_IN = 4, 5, 6  # non-square to catch transposed spatial factors
SPATIAL_PARAMS = {
    "channel": C,
    "full": C * H_IN * W_IN,
    "channel_spatial": C + H_IN * W_IN,
    "rank1": C + H_IN + W_IN,
}


def _pair_of_convs(scale: str, **kwargs: object) -> tuple[BinaryConv2d, BinaryConv2d]:
    """A conv with ``scale`` and an identical one without, sharing the latent weight."""
    args = {"in_channels": 3, "out_channels": C, "kernel_size": 3, "padding": 1, "bias": False, **kwargs}
    scaled = BinaryConv2d(**args, scale=scale, output_size=(H_IN, W_IN))  # type: ignore[arg-type]
    plain = BinaryConv2d(**args, scale="none")  # type: ignore[arg-type]
    with torch.no_grad():
        scaled.weight.normal_()
        plain.weight.copy_(scaled.weight)
    return scaled, plain


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 2.0)


@pytest.mark.parametrize("scale", list(SPATIAL_PARAMS))
def test_learned_scale_starts_at_one_and_has_table_parameter_count(scale: str) -> None:
    conv, _ = _pair_of_convs(scale)
    params = list(conv.scale_factor.parameters())
    assert params and all(torch.equal(p, torch.ones_like(p)) for p in params)
    assert sum(p.numel() for p in params) == SPATIAL_PARAMS[scale]
    assert sum(p.numel() for p in conv.parameters()) == conv.weight.numel() + SPATIAL_PARAMS[scale]


@pytest.mark.parametrize("scale", list(SPATIAL_PARAMS))
def test_learned_scale_forward_matches_formula(scale: str) -> None:
    torch.manual_seed(0)
    conv, plain = _pair_of_convs(scale)
    _randomise(conv.scale_factor)
    x = torch.randn(2, 3, H_IN, W_IN)
    y = plain(x)
    sf = conv.scale_factor
    if scale == "channel":
        expected = y * sf.alpha.view(1, C, 1, 1)
    elif scale == "full":
        assert sf.alpha.shape == (C, H_IN, W_IN)
        expected = y * sf.alpha.unsqueeze(0)
    elif scale == "channel_spatial":
        assert sf.beta.shape == (1, H_IN, W_IN)
        expected = y * sf.alpha.view(1, C, 1, 1) * sf.beta.view(1, 1, H_IN, W_IN)
    else:
        assert sf.beta.shape == (1, H_IN, 1) and sf.gamma.shape == (1, 1, W_IN)
        expected = y * sf.alpha.view(1, C, 1, 1) * sf.beta.view(1, 1, H_IN, 1) * sf.gamma.view(1, 1, 1, W_IN)
    assert torch.allclose(conv(x), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("scale", list(SPATIAL_PARAMS))
def test_gradients_reach_every_scale_factor(scale: str) -> None:
    torch.manual_seed(1)
    conv, _ = _pair_of_convs(scale)
    _randomise(conv.scale_factor)
    (conv(torch.randn(2, 3, H_IN, W_IN)) * torch.randn(2, C, H_IN, W_IN)).sum().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_xnor_scale_is_mean_abs_of_centred_weight_per_filter() -> None:
    torch.manual_seed(2)
    conv, plain = _pair_of_convs("xnor")
    x = torch.randn(2, 3, H_IN, W_IN)
    w = conv.weight.detach()
    alpha = torch.zeros(C)
    for o in range(C):
        centred = w[o] - w[o].mean(dim=0)
        alpha[o] = centred.abs().sum() / centred.numel()
    assert torch.allclose(conv(x), plain(x) * alpha.view(1, C, 1, 1), rtol=1e-5, atol=1e-5)
    assert list(conv.scale_factor.parameters()) == []


def test_xnor_k_scale_box_filters_channel_mean_of_abs_input() -> None:
    torch.manual_seed(3)
    k, s, p = 3, 2, 1
    conv = BinaryConv2d(3, C, k, stride=s, padding=p, bias=False, scale="xnor_k")
    plain = BinaryConv2d(3, C, k, stride=s, padding=p, bias=False, scale="none")
    with torch.no_grad():
        conv.weight.normal_()
        plain.weight.copy_(conv.weight)
    x = torch.randn(1, 3, 7, 6)
    y = plain(x)
    h_out, w_out = y.shape[-2:]
    a = x.abs().mean(dim=1)[0]  # (7, 6)
    kmap = torch.zeros(h_out, w_out)
    for i in range(h_out):
        for j in range(w_out):
            total = 0.0
            for di in range(k):
                for dj in range(k):
                    r, c = i * s - p + di, j * s - p + dj
                    if 0 <= r < a.shape[0] and 0 <= c < a.shape[1]:
                        total += float(a[r, c])
            kmap[i, j] = total / (k * k)
    w = conv.weight.detach()
    alpha = (w - w.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3))
    expected = y * alpha.view(1, C, 1, 1) * kmap.view(1, 1, h_out, w_out)
    assert torch.allclose(conv(x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- error messages


def test_unknown_scale_lists_valid_choices() -> None:
    for make in (lambda: BinaryConv2d(3, 4, 3, scale="gamma"), lambda: build_scale("gamma", 4)):
        with pytest.raises(ValueError, match="gamma") as err:
            make()
        assert all(name in str(err.value) for name in SCALES)
    with pytest.raises(ValueError, match="channel_spatial"):
        LearnedScale("xnor", 4)


def test_unknown_estimator_lists_valid_choices() -> None:
    for make in (lambda: get_estimator("tanh"), lambda: BinaryConv2d(3, 4, 3, estimator="tanh")):
        with pytest.raises(ValueError, match="tanh") as err:
            make()
        assert all(name in str(err.value) for name in ACTIVATION_ESTIMATORS)


@pytest.mark.parametrize("scale", ["full", "channel_spatial", "rank1"])
def test_spatial_scale_without_output_size_is_an_error(scale: str) -> None:
    with pytest.raises(ValueError, match="output_size"):
        BinaryConv2d(3, 4, 3, scale=scale)
    with pytest.raises(ValueError, match="output_size"):
        LearnedScale(scale, 4)
    BinaryConv2d(3, 4, 3, scale="channel")  # no spatial shape: no output_size needed


@pytest.mark.parametrize("scale", ["full", "channel_spatial", "rank1"])
def test_wrong_input_resolution_names_both_sizes(scale: str) -> None:
    conv = BinaryConv2d(3, 4, 3, padding=1, scale=scale, output_size=(5, 6))
    assert conv(torch.randn(1, 3, 5, 6)).shape == (1, 4, 5, 6)
    with pytest.raises(ValueError, match="5x6") as err:
        conv(torch.randn(1, 3, 8, 9))
    assert "8x9" in str(err.value)


def test_xnor_k_without_binary_inputs_is_an_error() -> None:
    with pytest.raises(ValueError, match="binarize_inputs"):
        BinaryConv2d(3, 4, 3, binarize_inputs=False, scale="xnor_k")


# ---------------------------------------------------------------- BinaryConv2d


PARITY_ARGS: list[dict[str, object]] = [
    {},
    {"stride": 2, "padding": 1},
    {"padding": 2, "dilation": 2},
    {"groups": 2, "padding": 1},
    {"bias": False},
    {"kernel_size": (3, 1), "stride": (2, 1), "padding": (1, 0)},
    {"padding": "same"},
    {"padding": 1, "padding_mode": "reflect"},
    {"padding": 1, "padding_mode": "circular", "bias": False},
    {"padding": 1, "padding_mode": "replicate", "groups": 4},
]


@pytest.mark.parametrize("kwargs", PARITY_ARGS, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_binary_conv_with_everything_off_matches_conv2d(kwargs: dict[str, object]) -> None:
    args = {"in_channels": 4, "out_channels": 8, "kernel_size": 3, **kwargs}
    torch.manual_seed(0)
    ref = nn.Conv2d(**args)  # type: ignore[arg-type]
    torch.manual_seed(0)
    conv = BinaryConv2d(**args, binarize_weights=False, binarize_inputs=False, scale="none")  # type: ignore[arg-type]
    assert torch.equal(conv.weight, ref.weight)
    assert (conv.bias is None) == (ref.bias is None)
    if ref.bias is not None:
        assert torch.equal(conv.bias, ref.bias)
    assert [n for n, _ in conv.named_parameters()] == [n for n, _ in ref.named_parameters()]

    x = torch.randn(2, 4, 9, 10)
    x_ref, x_bin = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_bin = ref(x_ref), conv(x_bin)
    assert torch.equal(out_bin, out_ref)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    out_bin.backward(g)
    assert torch.equal(x_bin.grad, x_ref.grad)
    for (name, p), (_, q) in zip(conv.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_binary_conv_accepts_every_conv2d_argument() -> None:
    ref = inspect.signature(nn.Conv2d.__init__).parameters
    ours = inspect.signature(BinaryConv2d.__init__).parameters
    assert list(ours)[: len(ref)] == list(ref)
    for name, param in ref.items():
        assert ours[name].default == param.default, name
    conv = BinaryConv2d(4, 8, 3, 1, 1, 1, 2, False, "zeros", "cpu", torch.float64)
    assert isinstance(conv, nn.Conv2d)
    assert conv.weight.dtype == torch.float64 and conv.bias is None and conv.groups == 2
    assert (conv.binarize_weights, conv.binarize_inputs, conv.scale) == (True, True, "none")
    rank1 = BinaryConv2d(4, 8, 3, padding=1, dtype=torch.float64, scale="rank1", output_size=(5, 5))
    assert all(p.dtype == torch.float64 for p in rank1.parameters())


def test_binary_latent_weights_start_small_and_non_negative() -> None:
    conv = BinaryConv2d(16, 32, 3)
    assert conv.weight.min() >= 0 and conv.weight.max() < 1e-3


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "padding": 1}, {"padding": 1, "groups": 2}])
def test_full_binary_conv_is_an_exact_integer_convolution(kwargs: dict[str, object]) -> None:
    torch.manual_seed(4)
    conv = BinaryConv2d(8, 6, 3, bias=False, scale="none", **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, 8, 9, 9)
    w = conv.weight.detach()
    expected = F.conv2d(binary_sign(x), binary_sign(w - w.mean(dim=1, keepdim=True)), **kwargs)  # type: ignore[arg-type]
    out = conv(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert torch.equal(out, out.round())
    assert out.abs().max() <= w[0].numel()
