"""The fused sign-conv-Gamma node equals the unfused path bit for bit and saves only bits per input."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import xnorpp  # noqa: F401  (registers the models)
from xnorpp.nn import BinaryConv2d, conv_output_size, int8_conv, kernels, native, weight_sign
from xnorpp.nn.fused import binary_input_conv2d, can_fuse, fused_binary_conv_forward, set_fused
from xnorpp.nn.kernels import code_sign, masked_grad, memory_format_of, sign_code

H = 9  # input height/width of the single-layer tests


@pytest.fixture(autouse=True)
def _restore_kernel_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests may switch the kernels (eager: PyTorch ops; compiled: torch.compile'd sign, C epilogues)."""
    monkeypatch.setattr(kernels, "_mode", kernels._mode)


def make_conv(cin: int = 8, cout: int = 12, k: int = 3, seed: int = 0, **kwargs: Any) -> BinaryConv2d:
    """A ``BinaryConv2d`` moved away from init: random latent weights, scale factors and bias."""
    stride, padding, dilation = kwargs.get("stride", 1), kwargs.get("padding", 0), kwargs.get("dilation", 1)
    out = conv_output_size((H, H), k, stride, padding, dilation)
    torch.manual_seed(seed)
    conv = BinaryConv2d(cin, cout, k, output_size=out, **kwargs)
    with torch.no_grad():
        for name, p in conv.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "scale_factor" in name else torch.randn_like(p))
    return conv


def make_input(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    """Gaussian input times 1.5 (both sides of the STE window) with exact -1, 1, 0 and -0.0 planted."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.5
    x.view(-1)[:4] = torch.tensor([-1.0, 1.0, 0.0, -0.0])
    return x


def forward_backward(
    conv: nn.Module, x: Tensor, fused: bool, autocast: torch.dtype | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Output and gradients (``input`` and every parameter) of ``sum(out * g)`` with a fixed ``g``."""
    set_fused(conv, fused)
    conv.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = conv(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    g = g.contiguous(memory_format=memory_format_of(out))  # as autograd's gradients come: the output's layout
    out.backward(g)
    grads = {"input": x.grad} | {n: p.grad for n, p in conv.named_parameters()}
    assert all(v is not None for v in grads.values())
    return out.detach(), grads  # type: ignore[return-value]


def assert_same(
    a: tuple[Tensor, dict[str, Tensor]], b: tuple[Tensor, dict[str, Tensor]], rounding: tuple[str, ...] = ()
) -> None:
    """Outputs bit-identical, gradients bit-identical up to the sign of a zero (a masked weight gradient is
    ``g * 0`` in the fused node, autograd's ``clamp`` backward writes ``+0.0``), all in the same layout;
    gradients named in ``rounding`` equal to float rounding."""
    assert a[0].dtype == b[0].dtype and same_bits(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        if name in rounding:
            torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-6, atol=1e-5)
            continue
        ga, gb = a[1][name], b[1][name]
        assert same_bits(ga, gb, signed_zeros=False), (name, (ga - gb).abs().max())


def same_bits(a: Tensor, b: Tensor, signed_zeros: bool = True) -> bool:
    """Same shape, dtype, memory order and bit pattern (``signed_zeros=False``: -0.0 counts as 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype or not native.same_memory_order(a, b):
        return False
    if not signed_zeros and a.is_floating_point():
        a, b = a + 0.0, b + 0.0  # -0.0 + 0.0 = +0.0; every other value, NaN included, unchanged
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


CONV_CASES: list[dict[str, Any]] = [
    {"scale": "rank1", "padding": 1},
    {"scale": "rank1", "stride": 2, "padding": 1},
    {"scale": "channel_spatial", "stride": 2, "padding": 0},
    {"scale": "full", "padding": 1, "bias": True},
    {"scale": "channel", "padding": 2, "dilation": 2, "groups": 2},
    {"scale": "channel", "padding": 1, "groups": 4, "bias": True},
    {"scale": "none", "k": 1, "bias": True},
    {"scale": "xnor", "padding": 1},
    {"scale": "xnor_k", "stride": 2, "padding": 1, "bias": True},
    {"scale": "rank1", "padding": 1, "binarize_weights": False},
    {"scale": "rank1", "padding": 1, "centre_weights": False},
]


@pytest.mark.parametrize("kernel_mode", ["eager", "compiled"])
@pytest.mark.parametrize("int8", [True, False], ids=["int8_conv", "fp32_conv"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fused_output_and_gradients_equal_unfused_bit_for_bit(
    case: dict[str, Any], int8: bool, kernel_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(int8_conv, "_enabled", int8)  # the fused forward conv in int8 (CPU default) or fp32
    kernels.set_kernels(kernel_mode)
    conv = make_conv(**case)
    assert conv.fused
    x = make_input((4, 8, H, H))
    # xnor's alpha = mean|W - mean W| is a second path into the latent weight: its gradient's four
    # terms (sign path, centring, alpha path, centring) reach W in another order, so they round differently
    rounding = ("weight",) if case["scale"].startswith("xnor") else ()
    calls = native.calls()
    fused = forward_backward(conv, x, fused=True)
    assert (native.calls() > calls) == (kernel_mode == "compiled")  # the C kernels ran (only) when compiled
    assert_same(fused, forward_backward(conv, x, fused=False), rounding)


@pytest.mark.parametrize("kernel_mode", ["eager", "compiled"])
def test_fused_equal_unfused_in_channels_last(kernel_mode: str) -> None:
    kernels.set_kernels(kernel_mode)
    conv = make_conv(scale="rank1", padding=1).to(memory_format=torch.channels_last)
    x = make_input((4, 8, H, H)).contiguous(memory_format=torch.channels_last)
    fused = forward_backward(conv, x, fused=True)
    assert fused[1]["input"].is_contiguous(memory_format=torch.channels_last)
    assert_same(fused, forward_backward(conv, x, fused=False))


@pytest.mark.parametrize("kernel_mode", ["eager", "compiled"])
@pytest.mark.parametrize("int8", [True, False], ids=["int8_conv", "fp32_conv"])
def test_fused_output_takes_the_layout_of_the_unfused_conv_with_channels_last_weights(
    int8: bool, kernel_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's conv returns channels-last when the weight is: so does the fused node, int8 conv or not."""
    monkeypatch.setattr(int8_conv, "_enabled", int8)
    kernels.set_kernels(kernel_mode)
    conv = make_conv(scale="rank1", padding=1).to(memory_format=torch.channels_last)
    x = make_input((4, 8, H, H))  # NCHW
    fused = forward_backward(conv, x, fused=True)
    assert memory_format_of(fused[0]) == torch.channels_last
    assert_same(fused, forward_backward(conv, x, fused=False))


def test_fused_equal_unfused_under_bf16_autocast_and_rounds_big_sums_once() -> None:
    # 288 input channels x 3x3: |sums| up to 2592, above bf16's exact-integer range (256)
    conv = make_conv(cin=288, cout=16, scale="rank1", padding=1, bias=False)
    with torch.no_grad():  # Gamma = 1: the output is the integer sum itself
        for p in conv.scale_factor.parameters():
            p.fill_(1.0)
    with torch.no_grad():  # signs aligned with the input's but in channel 0: sums up to 2592 - 2 * 9
        conv.weight[:, :144].fill_(1.0)
        conv.weight[:, 144:].fill_(-1.0)
        conv.weight[:, 0].fill_(-1.0)
    x = make_input((2, 288, H, H)).abs() + 0.1
    x[:, 144:] *= -1
    bf16 = forward_backward(conv, x, fused=True, autocast=torch.bfloat16)
    assert bf16[0].dtype == torch.bfloat16
    assert_same(bf16, forward_backward(conv, x, fused=False, autocast=torch.bfloat16))
    fp32 = forward_backward(conv, x, fused=True)
    assert fp32[0].abs().max() > 1024
    # the bf16 conv accumulates exactly and rounds once: the fp32 integer sum rounded to bf16's grid
    assert torch.equal(bf16[0], fp32[0].to(torch.bfloat16))
    assert not torch.equal(bf16[0].float(), fp32[0])


def test_fused_keeps_the_dtype_of_a_low_precision_model() -> None:
    conv = make_conv(scale="rank1", padding=1).to(torch.bfloat16)
    x = make_input((2, 8, H, H)).to(torch.bfloat16)
    out, grads = forward_backward(conv, x, fused=True)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads.values())
    assert_same((out, grads), forward_backward(conv, x, fused=False))


def saved_tensors(fn: Any) -> list[Tensor]:
    """Every tensor autograd saves while ``fn()`` runs."""
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def unique_bytes(tensors: list[Tensor], exclude: list[Tensor]) -> int:
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


def test_fused_saves_only_bits_of_the_input_and_fewer_bytes() -> None:
    conv = make_conv(cin=16, cout=24, scale="rank1", padding=1, bias=False)
    x = make_input((4, 16, H, H)).requires_grad_()
    params = list(conv.parameters())
    fused = saved_tensors(lambda: conv(x))
    input_sized = [t for t in fused if t.shape == x.shape]
    assert input_sized and all(t.dtype == torch.int8 for t in input_sized)
    assert not any(t.dtype == torch.float32 and t.shape[0] == x.shape[0] for t in fused)  # no activation
    assert any(t.dtype == torch.int16 and t.shape == (4, 24, H, H) for t in fused)  # the integer y
    set_fused(conv, False)
    unfused = saved_tensors(lambda: conv(x))
    assert any(t.dtype == torch.float32 and t.shape == x.shape for t in unfused)
    # per input element 1 byte instead of 5 (bool mask + fp32 +-1 input)
    assert unique_bytes([t for t in fused if t.shape == x.shape], params) == x.numel()
    assert unique_bytes([t for t in unfused if t.shape == x.shape], params) == 5 * x.numel()
    # in all (int16 y instead of fp32, the weight's code instead of the fp32 +-1 weight): under half
    fused_bytes, unfused_bytes = unique_bytes(fused, params), unique_bytes(unfused, params)
    assert fused_bytes < 0.5 * unfused_bytes, (fused_bytes, unfused_bytes)


def test_saved_code_is_the_sign_times_one_plus_the_inclusive_window() -> None:
    x = torch.tensor([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0]).view(1, 8, 1, 1).requires_grad_()
    w = torch.ones(1, 8, 1, 1)
    (code, *_rest) = [t for t in saved_tensors(lambda: binary_input_conv2d(x, w)) if t.shape == x.shape]
    assert code.dtype == torch.int8
    # x >= 0 gives +1, so -0.0 counts as +1; |code| = 2 inside the window -1 <= x <= 1
    assert code.flatten().tolist() == [-1, -2, -2, 2, 2, 2, 2, 1]
    assert code_sign(code, torch.float32).flatten().tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    assert masked_grad(torch.ones(8), code.flatten(), torch.float32).tolist() == [0, 1, 1, 1, 1, 1, 1, 0]
    assert torch.equal(sign_code(x.detach(), torch.float32)[1], code)


def test_latent_weight_code_matches_weight_sign_and_its_clamp_window() -> None:
    torch.manual_seed(0)
    w = (torch.randn(6, 5, 3, 3) * 1.5).requires_grad_()
    w.data[0, :, 0, 0] = torch.tensor([1.0, -1.0, 0.0, 2.0, -2.0])  # centred: 1, -1, 0, 2, -2 (mean 0)
    x = make_input((2, 5, H, H))
    saved = saved_tensors(lambda: binary_input_conv2d(x, w, binarize_weight=True))
    (wcode,) = [t for t in saved if t.shape == w.shape]
    assert wcode.dtype == torch.int8
    c = w.detach() - w.detach().mean(1, keepdim=True)
    assert torch.equal(code_sign(wcode, torch.float32), weight_sign(w.detach()))
    assert torch.equal(masked_grad(torch.ones(w.shape), wcode, torch.float32), (c.abs() <= 1).float())
    assert wcode[0, :, 0, 0].tolist() == [2, -2, 2, 1, -1]


def test_fused_is_the_default_only_where_it_applies() -> None:
    assert BinaryConv2d(4, 4, 3, scale="channel").fused
    assert not BinaryConv2d(4, 4, 3, scale="channel", binarize_inputs=False).fused
    assert not BinaryConv2d(4, 4, 3, scale="channel", estimator="approx_sign").fused
    assert not BinaryConv2d(4, 4, 3, scale="channel", padding=1, padding_mode="reflect").fused
    assert not BinaryConv2d(4, 4, 3, scale="channel", padding="same").fused
    forced = BinaryConv2d(4, 4, 3, scale="channel", estimator="identity")
    assert not can_fuse(forced)
    forced.fused = True
    with pytest.raises(ValueError, match="fused=False"):
        forced(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="fused=False"):
        fused_binary_conv_forward(forced, torch.randn(1, 4, 5, 5))


def test_fused_wrong_resolution_raises_the_scale_error() -> None:
    conv = make_conv(scale="rank1", padding=1)
    with pytest.raises(ValueError, match="9x9 output"):
        conv(torch.randn(1, 8, 7, 7))


@pytest.mark.parametrize("binarize_weights", [True, False])
def test_backward_twice_with_retain_graph_accumulates_equal_gradients(binarize_weights: bool) -> None:
    grads = []
    for fused in (True, False):
        conv = make_conv(scale="rank1", padding=1, binarize_weights=binarize_weights)
        set_fused(conv, fused)
        out = conv(make_input((2, 8, H, H)))
        out.sum().backward(retain_graph=True)
        out.square().sum().backward()
        grads.append([p.grad for p in conv.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gradient_only_for_what_requires_it() -> None:
    conv = make_conv(scale="rank1", padding=1)
    conv.weight.requires_grad_(False)
    x = make_input((2, 8, H, H))  # no grad for the input either
    conv(x).sum().backward()
    assert conv.weight.grad is None and conv.scale_factor.alpha.grad is not None


def small_resnet(fused: bool) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "resnet18_preact_bin", binarization="full_binary", scale="rank1", num_classes=10, input_size=16,
        stem="small",
    )  # fmt: skip
    with torch.no_grad():  # move the Gamma factors away from their init so that they matter
        for name, p in model.named_parameters():
            if "scale_factor" in name:
                p.uniform_(0.5, 1.5)
    assert set_fused(model, fused) == 19  # 16 block convs + 3 downsample convs
    return model


@pytest.mark.parametrize("kernel_mode", ["eager", "compiled"])
@pytest.mark.parametrize("int8", [True, False], ids=["int8_conv", "fp32_conv"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet18_trains_a_step_identically_fused_and_unfused(
    channels_last: bool, int8: bool, kernel_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(int8_conv, "_enabled", int8)
    kernels.set_kernels(kernel_mode)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=fmt)
    y = torch.tensor([0, 3, 7, 9])
    results = []
    for fused in (True, False):
        model = small_resnet(fused).to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        opt.step()
        second = F.cross_entropy(model(x), y)
        results.append((loss.item(), grads, second.item(), copy.deepcopy(model.state_dict())))
    (loss_f, grads_f, second_f, state_f), (loss_u, grads_u, second_u, state_u) = results
    assert loss_f == loss_u and second_f == second_u
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=0, atol=0)
    for name in state_f:
        assert torch.equal(state_f[name], state_u[name]), name
