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
    w = torch.zeros(2, 1, 3, 3)
    assert int8_conv.int8_conv_applies(torch.zeros(1, 1, 3, 3), w, torch.float32, (1, 1), 1, None)


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


def test_a_bias_keeps_the_fp32_conv_so_the_output_stays_bit_identical() -> None:
    case = CASES[0]
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(2)) * 1.5
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(3))
    calls = int8_conv.int8_conv_calls()
    fast, slow = fused_run(x, w, case, int8=True, bias=True), fused_run(x, w, case, int8=False, bias=True)
    assert int8_conv.int8_conv_calls() == calls  # the fp32 conv adds the bias inside its sum
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("shape", "error"),
    [((8, 9, 9), None),  # unbatched: as nn.Conv2d
     ((2, 16, 9, 9), "expected input.*to have 8 channels"),
     ((2, 8, 2, 2), "Kernel size can't be greater than actual input size")],
)  # fmt: skip
def test_shapes_the_int8_conv_does_not_take_behave_as_the_fp32_conv(
    shape: tuple[int, ...], error: str | None
) -> None:
    from xnorpp.nn import BinaryConv2d

    conv = BinaryConv2d(8, 6, 3, padding=1 if error is None else 0, bias=False, scale="channel")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    calls = int8_conv.int8_conv_calls()
    if error is not None:
        with pytest.raises(RuntimeError, match=error):
            conv(x)
    else:
        int8_conv.set_int8_conv(False)
        want = conv(x)
        int8_conv.set_int8_conv(True)
        assert torch.equal(conv(x), want) and want.shape == (6, 9, 9)
    assert int8_conv.int8_conv_calls() == calls


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
    assert int8_conv.int8_conv_active()  # probed before counting (the probe runs the kernel too)
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


def test_threads_wait_for_the_probe_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    def slow_failing_probe() -> str:
        time.sleep(0.3)
        return "RuntimeError: broken"

    monkeypatch.setattr(int8_conv, "_probe", slow_failing_probe)
    monkeypatch.setattr(int8_conv, "_probed", False)
    monkeypatch.setattr(int8_conv, "_unavailable", None)
    verdicts: list[bool] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [
            threading.Thread(target=lambda: verdicts.append(int8_conv.int8_conv_active())) for _ in range(3)
        ]
        for t in threads:
            t.start()
            time.sleep(0.05)  # the later threads arrive while the first one probes
        for t in threads:
            t.join()
    assert verdicts == [False, False, False]
