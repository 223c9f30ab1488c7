"""The fast max pool gives PyTorch's max pool bit for bit: values, argmax routing of gradients, errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xnorpp.nn import MaxPool2d, max_pool2d
from xnorpp.nn.pool import _MaxPool2dNCHW


def tied(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """ReLU'd Gaussians rounded to a coarse grid: most windows hold ties (zeros and equal maxima)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.mul(2).round().div(2).relu()


def pool_and_grads(fn: Callable[..., Tensor], x: Tensor, *args: object) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out, x, g)
    return out.detach(), grad


@pytest.mark.parametrize(
    ("shape", "args"),
    [
        ((4, 16, 28, 28), (3, 2, 1)),  # the ImageNet stem's pool
        ((3, 8, 17, 15), (3, 2, 1, 1, True)),  # odd sizes, ceil_mode
        ((2, 5, 12, 12), (2, None, 0)),  # default stride = kernel
        ((2, 6, 13, 11), ((3, 2), (1, 2), (1, 0), (2, 1))),  # rectangular, dilated
    ],
)
def test_values_and_gradients_match_torch_with_ties(shape: tuple[int, ...], args: tuple) -> None:
    x = tied(shape)
    want, want_grad = pool_and_grads(F.max_pool2d, x, *args)
    got, got_grad = pool_and_grads(max_pool2d, x, *args)
    assert got.is_contiguous() and got.shape == want.shape
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_the_fast_path_runs_for_contiguous_cpu_batches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_apply = _MaxPool2dNCHW.apply
    monkeypatch.setattr(_MaxPool2dNCHW, "apply", lambda *a: calls.append(1) or real_apply(*a))
    x = tied((2, 4, 8, 8))
    max_pool2d(x, 3, 2, 1)
    assert len(calls) == 1
    for other in (x.contiguous(memory_format=torch.channels_last), x[0], x.transpose(2, 3)):
        assert torch.equal(max_pool2d(other, 3, 2, 1), F.max_pool2d(other, 3, 2, 1))
    assert len(calls) == 1, "channels-last, unbatched and strided inputs keep PyTorch's own kernel"


def test_nan_wins_as_in_torch() -> None:
    x = tied((2, 3, 9, 9))
    x[0, 1, 2, 3] = float("nan")
    want, want_grad = pool_and_grads(F.max_pool2d, x, 3, 2, 1)
    got, got_grad = pool_and_grads(max_pool2d, x, 3, 2, 1)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(got_grad, want_grad)


def test_module_is_a_drop_in_maxpool() -> None:
    fast, ref = MaxPool2d(3, stride=2, padding=1), nn.MaxPool2d(3, stride=2, padding=1)
    assert isinstance(fast, nn.MaxPool2d) and repr(fast) == repr(ref) and fast.state_dict() == {}
    x = tied((2, 4, 10, 10))
    assert torch.equal(fast(x), ref(x))
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))
    with_idx = MaxPool2d(3, stride=2, padding=1, return_indices=True)
    assert all(torch.equal(a, b) for a, b in zip(with_idx(x), F.max_pool2d(x, 3, 2, 1, return_indices=True)))


def test_bad_arguments_raise_torch_errors() -> None:
    x = tied((1, 2, 4, 4))
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        max_pool2d(x, 3, 1, 2)
    with pytest.raises(RuntimeError):
        max_pool2d(x, 7)  # kernel larger than the input


def test_relu_after_pool_equals_pool_after_relu() -> None:
    """The model's stem pools before its ReLU: the same numbers and gradients as the usual order (a zero's
    sign may differ: relu keeps -0.0), NaN included."""
    x = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(3)).mul(2).round().div(2)
    x[0, 0, 0, :3] = torch.tensor([-1.0, -0.0, 0.0])
    x[1, 2, 5, 5] = float("nan")
    a, ga = pool_and_grads(lambda t: F.max_pool2d(F.relu(t), 3, 2, 1), x)
    b, gb = pool_and_grads(lambda t: F.relu(max_pool2d(t, 3, 2, 1)), x)
    assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any()
    assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(ga, gb)  # (== treats -0.0 as 0.0)


def test_double_backward_and_torch_func_work_as_for_torch() -> None:
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_()  # (no ties: finite differences need a differentiable point)
    assert torch.autograd.gradgradcheck(lambda t: max_pool2d(t, 3, 2, 1), (x,))

    def loss(fn: Callable[..., Tensor]) -> Callable[[Tensor], Tensor]:
        return lambda t: (fn(t, 3, 2, 1) ** 2).sum()

    got, want = (torch.func.grad(loss(fn))(x.detach()) for fn in (max_pool2d, F.max_pool2d))
    assert torch.equal(got, want)
