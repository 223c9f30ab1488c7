"""The fused binary conv's C kernels: bit-identical to PyTorch's ops, used when compiled, loud fallback."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

from xnorpp.nn import kernels, native

CL = torch.channels_last
SHAPES = [(3, 5, 7, 9), (2, 64, 56, 56), (4, 17, 3, 33), (1, 1, 1, 1), (5, 19, 1, 1)]


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled kernels for one test, then the mode before it (whatever a test switches to)."""
    monkeypatch.setattr(kernels, "_mode", "compiled")


def codes(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Random int8 codes from {-2, -1, 1, 2}."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 4, shape, generator=gen, dtype=torch.int8)
    return torch.tensor([-2, -1, 1, 2], dtype=torch.int8)[c.long()]


def grads(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    """Gaussian gradients with NaN, +-inf and -0.0 planted (their products with 0 and 1 must match too)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
    n = min(g.numel(), special.numel())
    g.view(-1)[:n] = special[:n]
    return g


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal bit patterns (NaN == NaN, -0.0 != 0.0), shape, dtype and memory order."""
    if a.shape != b.shape or a.dtype != b.dtype or not native.same_memory_order(a, b):
        return False
    if a.dtype == torch.float32:
        return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))
    return torch.equal(a, b)


def test_the_library_builds_here() -> None:
    assert native.available(), native.unavailable_reason()
    assert native.unavailable_reason() is None


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_code_sign_and_masked_grad_equal_the_pytorch_ops(
    shape: tuple[int, ...], fmt: torch.memory_format
) -> None:
    code = codes(shape).contiguous(memory_format=fmt)
    want = code.to(torch.float32).clamp_(-1, 1)
    assert same_bits(native.code_sign(code, fmt), want)
    grad = grads(shape).contiguous(memory_format=fmt)
    want = grad.clone().mul_(code.abs().bitwise_right_shift_(1))
    got = grad.clone()
    assert native.masked_grad_(got, code) is not None
    assert same_bits(got, want)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gamma_kernels_equal_the_pytorch_ops(shape: tuple[int, ...], fmt: torch.memory_format) -> None:
    _, c, h, w = shape
    gen = torch.Generator().manual_seed(2)
    y = (
        torch.randint(-4608, 4609, shape, generator=gen).float().contiguous(memory_format=CL)
    )  # as the int8 conv
    gamma = torch.rand(c, h, w, generator=gen) + 0.5
    y_in = y.clone()
    out, y16 = native.gamma_forward(y_in, gamma, fmt)
    assert (out.data_ptr() == y_in.data_ptr()) == (fmt == CL)  # channels-last: in place, no new buffer
    want = y.contiguous(memory_format=fmt)
    assert same_bits(y16, want.to(torch.int16))
    assert same_bits(out, want * gamma)
    grad = grads(shape).contiguous(memory_format=fmt)
    row = (gamma.unsqueeze(0).contiguous(memory_format=fmt))[0]
    prod, scaled = native.gamma_backward(grad, y16, row)
    assert same_bits(prod, y16.to(torch.float32) * grad)
    assert same_bits(scaled, grad * gamma)


@pytest.mark.parametrize("shape", [*SHAPES, (2, 24, 4, 8)], ids=str)
def test_sign_code_u8_equals_the_eager_kernel_with_a_channels_last_operand(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 1.5
    special = [
        -1.0,
        1.0,
        0.0,
        -0.0,
        -1.0000001,
        1.0000001,
        0.9999999,
        -0.9999999,
        float("nan"),
        -float("inf"),
    ]
    x.view(-1)[: min(x.numel(), len(special))] = torch.tensor(special)[: x.numel()]
    u, code = native.sign_code_u8(x)
    want_u, want_code = kernels._sign_code_u8(x)  # the eager definition
    assert u.is_contiguous(memory_format=CL) and code.is_contiguous()
    assert torch.equal(u, want_u) and torch.equal(code, want_code)


def test_wrong_inputs_are_errors_that_name_the_problem() -> None:
    code = codes((2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"code must be a CPU torch\.int8 tensor"):
        native.code_sign(code.float())
    with pytest.raises(ValueError, match="dense"):
        native.code_sign(code[:, :, ::2])
    with pytest.raises(ValueError, match="one shape and one dense memory order"):
        native.masked_grad_(torch.zeros(2, 3, 4, 5).contiguous(memory_format=CL), code)
    with pytest.raises(ValueError, match=r"x must be a contiguous \(NCHW\) 4-d tensor"):
        native.sign_code_u8(torch.zeros(2, 3, 4, 5).contiguous(memory_format=CL))
    with pytest.raises(ValueError, match="channels-last"):
        native.gamma_forward(torch.zeros(2, 3, 4, 5), torch.ones(3, 4, 5), torch.contiguous_format)
    with pytest.raises(ValueError, match=r"gamma must have shape \(3, 4, 5\)"):
        native.gamma_forward(torch.zeros(2, 3, 4, 5).contiguous(memory_format=CL), torch.ones(3, 1, 1), CL)
    with pytest.raises(ValueError, match="gamma must be laid out as one sample of grad"):
        native.gamma_backward(
            torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5, dtype=torch.int16), torch.ones(3, 1, 1)
        )


def test_compiled_mode_runs_the_epilogues_in_c_with_identical_results(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    for name in ("sign_code_u8", "code_sign", "masked_grad_", "gamma_forward", "gamma_backward"):
        fn = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    y = (
        torch.randint(-50, 51, (4, 6, 5, 7)).float().contiguous(memory_format=CL)
    )  # as the int8 conv returns it
    gamma = torch.rand(6, 5, 7) + 0.5
    code, grad = codes((4, 6, 5, 7)), grads((4, 6, 5, 7), seed=3)
    x = grads((4, 6, 5, 7), seed=4) * 1.5  # NaN, infinities and zeros planted
    results = []
    for mode in ("compiled", "eager"):
        kernels.set_kernels(mode)
        u, x_code = kernels.sign_code_u8(x)
        out, y16 = kernels.gamma_forward(y.clone(), gamma)
        dgamma, scaled = kernels.gamma_backward(grad, y16, gamma, True)
        xb = kernels.code_sign(code, torch.float32)
        masked = kernels.masked_grad(grad.clone(), code, torch.float32)
        results.append((x_code, out, y16, dgamma, scaled, xb, masked))
        if mode == "compiled":
            assert sorted(calls) == [
                "code_sign",
                "gamma_backward",
                "gamma_forward",
                "masked_grad_",
                "sign_code_u8",
            ]
            assert u.is_contiguous(memory_format=CL)  # as oneDNN reads it
        else:
            assert u.is_contiguous()
        results[-1] += (u.contiguous(),)
    assert len(calls) == 5  # eager mode never calls the C kernels
    for a, b in zip(*results, strict=True):
        assert same_bits(a, b)
    assert results[0][0].is_contiguous()  # the NCHW network gets NCHW outputs


def test_a_failed_build_warns_once_and_falls_back_to_identical_results(
    compiled: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XNORPP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setattr(kernels, "_native_warned", False)
    code = codes((2, 3, 4, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kernels.code_sign(code, torch.float32)
        second = kernels.masked_grad(grads((2, 3, 4, 5)), code, torch.float32)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert (
        "the binary layers' C kernels cannot be used (RuntimeError: " in messages[0]
        and "false" in messages[0]
    )
    assert "trainer.kernels=eager" in messages[0] and str(tmp_path) in messages[0]
    assert not native.available() and "failed" in (native.unavailable_reason() or "")
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    kernels.set_kernels("eager")
    assert same_bits(first, kernels.code_sign(code, torch.float32))
    assert same_bits(second, kernels.masked_grad(grads((2, 3, 4, 5)), code, torch.float32))


def test_the_library_is_built_once_per_cache_and_reused(tmp_path: Path) -> None:
    """A fresh cache gets one library file; a second process loads it without building again."""
    script = (
        "from xnorpp.nn import native; assert native.available(), native.unavailable_reason(); "
        "print(native.library_path(native._compiler()))"
    )
    env = {**os.environ, "XNORPP_CACHE_DIR": str(tmp_path)}
    first = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    path = Path(first.stdout.strip())
    assert path.parent == tmp_path and path.exists()
    mtime = path.stat().st_mtime_ns
    second = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert Path(second.stdout.strip()) == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_unwritable_cache_is_named_in_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "not-a-dir"
    cache.write_text("a file where the cache directory should be")
    monkeypatch.setenv("XNORPP_CACHE_DIR", str(cache))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    assert not native.available()
    assert str(cache) in (native.unavailable_reason() or "")


def test_views_and_shapes_the_c_kernels_do_not_take_fall_back_to_identical_results(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lazily negated view (its memory holds -x), a 4-d Gamma, an empty batch: PyTorch's ops, same bits."""
    x = grads((2, 8, 4, 4), seed=5) * 1.5
    neg = torch._neg_view(x)
    assert neg.is_neg() and neg.is_contiguous()
    u, code = kernels.sign_code_u8(neg)
    want_u, want_code = kernels._sign_code_u8(-x)
    assert torch.equal(u, want_u) and torch.equal(code, want_code)
    grad, y16 = grads((2, 8, 4, 4), seed=6), torch.randint(-50, 51, (2, 8, 4, 4), dtype=torch.int16)
    gamma4 = torch.rand(1, 8, 1, 1) + 0.5  # as a (1, C, 1, 1) scale would give it
    dgamma, scaled = kernels.gamma_backward(grad, y16, gamma4, True)
    assert same_bits(scaled, grad * gamma4)
    assert same_bits(dgamma, (y16.float() * grad).sum_to_size(gamma4.shape))
    empty = torch.zeros(0, 8, 4, 4)
    dgamma, scaled = kernels.gamma_backward(empty, empty.to(torch.int16), torch.ones(8, 4, 4), True)
    assert scaled.shape == empty.shape and torch.equal(dgamma, torch.zeros(8, 4, 4))
    assert kernels.code_sign(torch.zeros(0, 3, dtype=torch.int8), torch.float32).shape == (0, 3)


def test_the_portable_loops_equal_the_avx2_ones(tmp_path: Path) -> None:
    """Built with ``-mno-avx2`` (``XNORPP_CFLAGS``), every kernel takes its plain C loops: same results."""
    script = """
import torch
from xnorpp.nn import kernels, native
assert native.available(), native.unavailable_reason()
gen = torch.Generator().manual_seed(0)
for shape in [(2, 64, 8, 8), (3, 24, 5, 7), (2, 17, 4, 4)]:
    x = torch.randn(shape, generator=gen) * 1.5
    x.view(-1)[:4] = torch.tensor([float("nan"), -0.0, 1.0, -1.0])
    u, code = native.sign_code_u8(x)
    want_u, want_code = kernels._sign_code_u8(x)
    assert torch.equal(u, want_u) and torch.equal(code, want_code), shape
    y = torch.randint(-300, 301, shape, generator=gen).float().contiguous(memory_format=torch.channels_last)
    gamma = torch.rand(shape[1:], generator=gen)
    out, y16 = native.gamma_forward(y.clone(), gamma, torch.contiguous_format)
    want = y.contiguous()
    assert torch.equal(out, want * gamma) and torch.equal(y16, want.to(torch.int16)), shape
print(native.library_path(native._compiler()))
"""
    env = {**os.environ, "XNORPP_CACHE_DIR": str(tmp_path), "XNORPP_CFLAGS": "-mno-avx2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    portable = Path(out.stdout.strip())
    assert portable.exists() and portable.name != native.library_path(native._compiler()).name  # own key


def test_off_linux_the_c_kernels_say_once_that_they_are_linux_only(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On macOS (or Windows) nothing crashes and nothing asks for a compiler the user has."""
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setattr(kernels, "_native_warned", False)
    code = codes((2, 3, 4, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels.code_sign(code, torch.float32)
        kernels.code_sign(code, torch.float32)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert "built on Linux only, this is Darwin" in message and "nothing to install" in message
    assert "gcc" not in message and "compiler" not in message
    assert "xcode-select --install" in native.compiler_hint()  # what torch.compile's failure names there
