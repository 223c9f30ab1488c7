"""The exact int8 forward conv of binary layers on CPU: equal to the fp32 conv, used where it applies,
and a broken kernel falls back to the fp32 conv with one warning."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from xnorpp.nn import int8_conv
from xnorpp.nn.fused import binary_input_conv2d

CASES: list[dict[str, Any]] = [
    {"cin": 16, "cout": 32, "k": 3, "stride": 1, "padding": 1, "dilation": 1, "groups": 1},
    {"cin": 16, "cout": 8, "k": 3, "stride": 2, "padding": 1, "dilation": 1, "groups": 1},
    {"cin": 8, "cout": 12, "k": 3, "stride": 1, "padding": 2, "dilation": 2, "groups": 4},
    {"cin": 64, "cout": 32, "k": 1, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
    {"cin": 512, "cout": 16, "k": 3, "stride": 1, "padding": 1, "dilation": 1, "groups": 1},  # |y| to 4608
]


def conv_args(case: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    return ((case["stride"],) * 2, (case["padding"],) * 2, (case["dilation"],) * 2, case["groups"])


def pm_one(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).sign_()


@pytest.fixture(autouse=True)
def _restore_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_conv, "_enabled", True)


def test_the_kernel_is_available_in_the_pinned_torch_build() -> None:
    assert int8_conv.int8_conv_active()
    assert int8_conv.int8_conv_applies(torch.zeros(1, 1, 3, 3), torch.float32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("channels_last", [False, True])
def test_int8_conv_of_pm_one_operands_equals_the_fp32_conv_exactly(
    case: dict[str, Any], channels_last: bool
) -> None:
    x = pm_one((3, case["cin"], 9, 9), seed=0)
    w = pm_one((case["cout"], case["cin"] // case["groups"], case["k"], case["k"]), seed=1)
    x[:, :, :6, :6] = 1.0  # filters of all +1 / all -1 there: the largest sums, +-cin/groups * k * k
    w[0], w[-1] = 1.0, -1.0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    u = x.add(1).to(torch.uint8).contiguous(memory_format=fmt)
    got = int8_conv.binary_conv2d_int8(u, w.to(torch.int8), *conv_args(case), memory_format=fmt)
    want = F.conv2d(x, w, None, *conv_args(case))
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)
    assert torch.equal(got, want)
    fan_in = case["cin"] // case["groups"] * case["k"] ** 2  # 4608 = 512 * 9, ResNet-18's largest
    assert want.max() == fan_in and want.min() == -fan_in


def fused_run(x: Tensor, w: Tensor, case: dict[str, Any], int8: bool, bias: bool = False) -> list[Tensor]:
    """Output and the gradients of input, latent weight and Gamma (or bias) of the fused node."""
    int8_conv.set_int8_conv(int8)
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    extra = torch.linspace(0.5, 1.5, w.shape[0]).view(-1, 1, 1).requires_grad_()
    b, gamma = (extra.detach().view(-1).requires_grad_(), None) if bias else (None, extra)
    out = binary_input_conv2d(x, w, b, gamma, *conv_args(case), binarize_weight=True, centre=True)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    return [out.detach(), x.grad, w.grad, (b if bias else extra).grad]  # type: ignore[list-item]


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_node_with_int8_conv_is_bit_identical_and_keeps_the_layout(
    case: dict[str, Any], channels_last: bool
) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(4, case["cin"], 9, 9, generator=torch.Generator().manual_seed(2)) * 1.5).contiguous(
        memory_format=fmt
    )
    w = torch.randn(
        case["cout"], case["cin"] // case["groups"], 3, 3, generator=torch.Generator().manual_seed(3)
    )
    fast, slow = fused_run(x, w, case, int8=True), fused_run(x, w, case, int8=False)
    assert fast[0].is_contiguous(memory_format=fmt)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


def test_bias_is_added_after_the_exact_sum_within_one_rounding() -> None:
    case = CASES[0]
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(2)) * 1.5
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(3))
    fast, slow = fused_run(x, w, case, int8=True, bias=True), fused_run(x, w, case, int8=False, bias=True)
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=1e-5)  # one ulp of sums up to 144
    for a, b in zip(fast[1:], slow[1:], strict=True):
        assert torch.equal(a, b)  # backward does not depend on the forward conv


def count_int8_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = int8_conv._conv

    def counting(*args: Any) -> Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(int8_conv, "_conv", counting)
    return calls


def test_int8_conv_runs_only_for_fp32_cpu_binary_weights_and_when_switched_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = count_int8_calls(monkeypatch)
    x, w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3)

    def conv(x: Tensor, binarize_weight: bool = True) -> Tensor:
        return binary_input_conv2d(x, w, None, None, (1, 1), (1, 1), (1, 1), 1, binarize_weight, True)

    conv(x)
    assert len(calls) == 1
    conv(x, binarize_weight=False)  # real weights: not +-1, no int8 conv
    conv(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)
    int8_conv.set_int8_conv(False)
    conv(x)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="true or false"):
        int8_conv.set_int8_conv("yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("broken", "message"),
    [("raises", "RuntimeError: no such op"), ("wrong", "its result differs from the fp32 conv by up to 2.0")],
)
def test_a_broken_kernel_warns_once_and_falls_back_to_the_fp32_conv(
    monkeypatch: pytest.MonkeyPatch, broken: str, message: str
) -> None:
    def bad(u: Tensor, w: Tensor, *args: Any) -> Tensor:
        if broken == "raises":
            raise RuntimeError("no such op\nsecond line")
        return F.conv2d(u.float() - 1, w.float(), None, *args) + 2

    monkeypatch.setattr(int8_conv, "_conv", bad)
    monkeypatch.setattr(int8_conv, "_probed", False)
    monkeypatch.setattr(int8_conv, "_unavailable", None)
    case = CASES[0]
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(2)) * 1.5
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(3))
    with pytest.warns(
        RuntimeWarning, match=f"int8 binary conv is unavailable \\({message}.*trainer.int8_conv=false"
    ):
        got = fused_run(x, w, case, int8=True)
    assert not int8_conv.int8_conv_active()
    want = fused_run(x, w, case, int8=False)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # probed once: no second warning
        fused_run(x, w, case, int8=True)
