"""The binary convolution's forward as an exact ``int8`` convolution on CPU (oneDNN).

With binary inputs and binary weights, ``conv2d(sign(x), sign(W))`` is a convolution of ``+-1``
operands: every output is an integer sum, ``|y| <= C_in/groups * kh * kw`` (4608 in ResNet-18), which
fp32 holds exactly. oneDNN's quantized convolution (``torch.ops.onednn.qconv2d_pointwise``, the
kernel PyTorch's x86 quantization lowers to) computes the same sums with ``uint8 x int8`` products
accumulated in ``int32`` and returns them as fp32, so the result is **bit-identical** to the fp32 conv,
measured 1.8-3x faster than it on a 2-core AVX2 CPU for ResNet-18's block convs (70.6 -> 24.2 ms for
the first stage at batch 32).

Encoding: the input is ``u = sign(x) + 1`` (``0`` or ``2``, ``uint8``) with zero point 1, so oneDNN
multiplies ``u - 1 = +-1``; zero padding is the zero point, so padded positions add 0 as in the fp32
conv. The weight is ``sign(W)`` as ``int8`` (scale 1, zero point 0), packed for oneDNN every forward
(the latent weight changes every step; ~0.1-1.5 ms per layer).

Used by :class:`~xnorpp.nn.fused.BinaryInputConv2dFn` for fp32 CPU forwards of layers with binary
weights, unless switched off (``set_int8_conv(False)``, ``trainer.int8_conv=false``). The first use
checks the kernel once against the fp32 conv on a small case; if the op is missing (a PyTorch build
without oneDNN) or disagrees, it warns once, names the cause and the fp32 conv is used instead.
Backward is unchanged: the gradients need real-valued ``grad_output`` and run in fp32.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "binary_conv2d_int8",
    "int8_conv_active",
    "int8_conv_applies",
    "int8_conv_calls",
    "int8_conv_enabled",
    "set_int8_conv",
]

_enabled = True
_unavailable: str | None = None  # why the kernel cannot be used, once the probe failed
_probed = False
_probe_lock = threading.Lock()
_calls = 0  # int8 convs run in this process


def set_int8_conv(enabled: bool) -> None:
    """Use the exact ``int8`` conv for binary forwards on CPU (default) or always the fp32 conv."""
    global _enabled
    if not isinstance(enabled, bool):
        raise ValueError(f"int8_conv must be true or false, got {enabled!r}")
    _enabled = enabled


def int8_conv_enabled() -> bool:
    """The switch of :func:`set_int8_conv` (whether the kernel works is :func:`int8_conv_active`)."""
    return _enabled


def _conv(
    u: Tensor,
    w: Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """oneDNN's ``uint8 x int8`` conv (input zero point 1, all scales 1) with an fp32 result."""
    conv = (list(stride), list(padding), list(dilation), groups)
    cpu, c_out = u.device, w.shape[0]  # never the default device (torch.set_default_device)
    packed = torch.ops.onednn.qconv_prepack(w, torch.ones(1, device=cpu), 1.0, 1, *conv, list(u.shape))
    return torch.ops.onednn.qconv2d_pointwise(
        u, 1.0, 1, packed, torch.ones(c_out, device=cpu), torch.zeros(c_out, dtype=torch.long, device=cpu), None,
        *conv, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def _probe() -> str | None:
    """``None`` if the int8 conv matches the fp32 conv on a small strided, padded, grouped case."""
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 9, 9, generator=gen, device="cpu").sign_()
        w = torch.randn(6, 4, 3, 3, generator=gen, device="cpu").sign_()
        args = ((2, 2), (1, 1), (1, 1), 2)
        got = _conv(x.add(1).to(torch.uint8), w.to(torch.int8), *args)
        want = F.conv2d(x, w, None, *args)
        if not torch.equal(got, want):
            return f"its result differs from the fp32 conv by up to {(got - want).abs().max().item()}"
    except Exception as e:  # the op may be missing or reject the arguments in some builds
        first_line = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first_line}"
    return None


def int8_conv_active() -> bool:
    """Whether the ``int8`` conv is switched on and works in this PyTorch build (probed once)."""
    global _probed, _unavailable
    if not _enabled:
        return False
    if not _probed:
        with _probe_lock:  # other threads wait for the verdict
            if _probed:
                return _unavailable is None
            _unavailable = _probe()
            _probed = True
        if _unavailable is not None:
            warnings.warn(
                f"the exact int8 binary conv is unavailable ({_unavailable}); using the fp32 conv (same "
                "results, slower on CPU). Set trainer.int8_conv=false (xnorpp.accel.configure({'int8_conv': False})) "
                "to skip this check.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _unavailable is None


def int8_conv_calls() -> int:
    """How many ``int8`` convs this process has run (to tell whether a run used them)."""
    return _calls


def int8_conv_applies(
    x: Tensor, weight: Tensor, dtype: torch.dtype, out_size: tuple[int, ...], groups: int, bias: Tensor | None
) -> bool:
    """Whether a binary conv of ``x`` with ``weight`` in ``dtype`` runs as the ``int8`` conv: a batched
    4-d fp32 input on CPU whose channels match ``weight`` and ``groups``, a non-empty output, no bias (the
    fp32 conv adds it inside its sum, so only there is the result the fp32 conv's bit for bit), outside
    ``torch.compile`` tracing (the compiled model keeps the float conv it can fuse). Anything else takes
    the fp32 conv, which also raises PyTorch's errors for wrong shapes."""
    return (
        x.device.type == "cpu"
        and dtype == torch.float32
        and bias is None
        and x.dim() == 4
        and weight.dim() == 4
        and x.shape[1] == weight.shape[1] * groups
        and weight.shape[0] % groups == 0
        and min(out_size, default=0) > 0
        and not torch.compiler.is_compiling()
        and int8_conv_active()
    )


def binary_conv2d_int8(
    u: Tensor,
    w: Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    memory_format: torch.memory_format | None = torch.contiguous_format,
) -> Tensor:
    """``conv2d(u - 1, w)`` in fp32, exact: ``u`` is ``sign(x) + 1`` as ``uint8``, ``w`` is ``+-1`` as ``int8``.

    oneDNN returns channels-last; the result is returned in ``memory_format`` (``None``: as returned).
    """
    global _calls
    _calls += 1
    y = _conv(u, w, stride, padding, dilation, groups)
    return y if memory_format is None else y.contiguous(memory_format=memory_format)
