"""A lean binary convolution: ``sign(x) -> conv -> Gamma`` in one autograd node that saves bits.

The unfused path (``sign_ste`` then ``F.conv2d`` then ``y * Gamma``) keeps, per input element, a bool
mask (1 byte) for the STE and the fp32 ``+-1`` input (4 bytes) for the weight gradient, plus the fp32
conv output ``y`` (4 bytes per output element) for ``dGamma``. :class:`BinaryInputConv2dFn` keeps:

- one ``uint8`` code per input element with two bits: bit 0 the STE window (``|x| <= 1``,
  inclusive), bit 1 the sign (``x >= 0``, so ``sign(0) = +1`` as :func:`~xnorpp.nn.sign.binary_sign`);
  backward rebuilds the ``+-1`` input from bit 1 and feeds ``aten.convolution_backward``
  (what ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` call) once for both gradients;
- for binary weights (exactly ``+-1``), the weight's sign as a bool instead of the fp32 weight;
- when ``Gamma`` is fused and the weights are binary, ``y`` as ``int16``: ``y`` is then an exact integer
  sum of ``+-1`` products with ``|y| <= C_in/groups * kh * kw`` (4608 in ResNet-18), stored losslessly.

Forward values and gradients are bit-identical to the unfused path (same ops on the same values), in
fp32 and under autocast. Under ``torch.autocast`` the conv runs in the autocast dtype: the ``+-1``
operands are exact, but sums above 256 (bf16) or 2048 (fp16) are rounded to that dtype's grid (steps
of 2, 4, ... 32 for bf16 between 256 and 8192), in the fused and unfused paths alike.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from .scale import LearnedScale, ScaleFactor

__all__ = [
    "BinaryInputConv2dFn",
    "binary_input_conv2d",
    "can_fuse",
    "fused_binary_conv_forward",
    "set_fused",
]

_WINDOW_BIT = 1  # code bit 0: |x| <= 1
_SIGN_BIT = 2  # code bit 1: x >= 0
_INT16_SAFE = 2**14  # |y| <= fan_in stays <= 2**14 after rounding to fp16/bf16, so it fits int16


class _ConvLike(Protocol):
    """The attributes of :class:`~xnorpp.nn.BinaryConv2d` the fused forward reads."""

    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, ...]
    padding: Any
    dilation: tuple[int, ...]
    groups: int
    kernel_size: tuple[int, ...]
    out_channels: int
    padding_mode: str
    binarize_weights: bool
    binarize_inputs: bool
    estimator: str
    scale: str
    scale_factor: ScaleFactor

    def binary_weight(self) -> Tensor: ...

    def scaled_weight_source(self) -> Tensor: ...


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the conv runs in: the autocast dtype when autocast is on for ``x``'s device."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def _plus_minus_one(bits: Tensor, dtype: torch.dtype, inplace: bool = False) -> Tensor:
    """``2 * bits - 1`` in ``dtype`` and ``bits``' memory layout; ``bits`` is bool or 0/1 ``uint8``.

    Goes through ``int8`` (``inplace``: overwriting ``bits``): several times faster on CPU than
    ``torch.where`` with a bool condition or a bool-to-float cast.
    """
    b = bits.view(torch.int8)
    b = b.mul_(2) if inplace else b * 2
    return b.sub_(1).to(dtype)


class BinaryInputConv2dFn(torch.autograd.Function):
    """``out = conv2d(sign(x), w, bias) [* gamma]`` with the clipped STE; saves bits, not fp32 tensors.

    Inputs: ``x`` (real), ``weight`` (the weight the conv uses, e.g. ``weight_sign``'s ``+-1``
    output), ``bias`` (added inside the conv, only without ``gamma``), ``gamma`` (``Gamma``
    broadcastable to the output's (C, H, W), or ``None``), the conv's ``stride``, ``padding`` (ints),
    ``dilation``, ``groups``, and ``binary_weight``: ``weight`` is exactly ``+-1`` (then only its sign
    and an ``int16`` copy of ``y`` are kept).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        gamma: Tensor | None,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        binary_weight: bool,
    ) -> Tensor:
        if bias is not None and gamma is not None:
            raise ValueError("pass either bias (added inside the conv) or gamma, not both")
        dtype = _compute_dtype(x)
        bits = x >= 0
        code = x.ge(-1).logical_and_(x.le(1)).view(torch.uint8).add_(bits.view(torch.uint8), alpha=_SIGN_BIT)
        xb = _plus_minus_one(bits, dtype, inplace=True)
        del bits
        w = weight.to(dtype)
        y = F.conv2d(xb, w, None if bias is None else bias.to(dtype), stride, padding, dilation, groups)
        del xb
        saved_w = weight >= 0 if binary_weight else weight
        saved_y = None
        out = y
        if gamma is not None:
            g = gamma.to(y.dtype)
            if gamma.requires_grad:
                exact = binary_weight and math.prod(weight.shape[1:]) <= _INT16_SAFE
                saved_y = y.to(torch.int16) if exact else y
            out = y.mul_(g) if saved_y is not y else y * g
        ctx.save_for_backward(code, saved_w, gamma, saved_y)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.meta = (binary_weight, dtype, x.dtype, weight.dtype, None if bias is None else list(bias.shape))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        code, saved_w, gamma, saved_y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        binary_weight, dtype, x_dtype, w_dtype, bias_shape = ctx.meta
        need_x, need_w, need_b, need_g = ctx.needs_input_grad[:4]
        grad_gamma = None
        if gamma is not None:
            buf = None
            if need_g:  # dGamma = sum over the broadcast dims of grad * y
                exact = saved_y.dtype == torch.int16  # else saved_y is y itself: keep it intact
                buf = saved_y.to(grad.dtype).mul_(grad) if exact else grad * saved_y
                grad_gamma = buf.sum_to_size(gamma.shape).to(gamma.dtype)
            grad = torch.mul(grad, gamma.to(grad.dtype), out=buf)  # reuse the product's buffer
        grad_x = grad_w = grad_b = None
        if need_x or need_w or need_b:
            w = _plus_minus_one(saved_w, dtype) if binary_weight else saved_w.to(dtype)
            xb = _plus_minus_one(code >> 1, dtype, inplace=True)
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, xb, w, bias_shape, stride, padding, dilation, False, [0] * len(stride), groups,
                [need_x, need_w, need_b],
            )  # fmt: skip
            del xb
            if grad_x is not None:
                grad_x = grad_x.to(x_dtype).mul_(code & _WINDOW_BIT)
            if grad_w is not None:
                grad_w = grad_w.to(w_dtype)
            if grad_b is not None:
                grad_b = grad_b.to(w_dtype)
        return grad_x, grad_w, grad_b, grad_gamma, None, None, None, None, None


def binary_input_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    gamma: Tensor | None = None,
    stride: tuple[int, ...] = (1, 1),
    padding: tuple[int, ...] = (0, 0),
    dilation: tuple[int, ...] = (1, 1),
    groups: int = 1,
    binary_weight: bool = False,
) -> Tensor:
    """``conv2d(sign_ste(x), weight, bias) [* gamma]`` in one node (see :class:`BinaryInputConv2dFn`)."""
    return BinaryInputConv2dFn.apply(x, weight, bias, gamma, stride, padding, dilation, groups, binary_weight)


def can_fuse(conv: _ConvLike) -> bool:
    """Whether ``conv`` can take the fused path: binary inputs, ``ste``, zero padding given as ints."""
    padding_ints = isinstance(conv.padding, tuple) and all(isinstance(p, int) for p in conv.padding)
    return conv.binarize_inputs and conv.estimator == "ste" and conv.padding_mode == "zeros" and padding_ints


def _output_hw(conv: _ConvLike, x: Tensor) -> tuple[int, int]:
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    h, w = x.shape[-2:]
    return (
        (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1,
        (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1,
    )


def fused_binary_conv_forward(conv: _ConvLike, x: Tensor) -> Tensor:
    """:meth:`BinaryConv2d.forward` through :func:`binary_input_conv2d` (learned ``Gamma`` fused in).

    Same result as the unfused forward; other scales (``xnor``, ``xnor_k``) are applied after the fused
    sign-conv, unchanged. Raises ``ValueError`` if ``conv`` does not satisfy :func:`can_fuse`.
    """
    if not can_fuse(conv):
        raise ValueError(
            "the fused binary conv needs binarize_inputs=True, estimator='ste', padding_mode='zeros' and "
            f"integer padding; got {conv.binarize_inputs=}, {conv.estimator=}, {conv.padding_mode=}, "
            f"{conv.padding=}: set fused=False on this module"
        )
    scale = conv.scale_factor
    learned = isinstance(scale, LearnedScale)
    if learned and scale.out_size is not None and _output_hw(conv, x) != scale.out_size:
        scale(x.new_empty(0, conv.out_channels, *_output_hw(conv, x)), conv.weight, x)  # raises its error
    w = conv.binary_weight()
    gamma = scale.gamma_tensor() if learned else None
    inner_bias = conv.bias if conv.scale == "none" else None  # as the unfused path: in the conv
    y = binary_input_conv2d(
        x, w, inner_bias, gamma, conv.stride, conv.padding, conv.dilation, conv.groups, conv.binarize_weights
    )
    if not learned and conv.scale != "none":
        y = scale(y, conv.scaled_weight_source(), x)
    if conv.bias is not None and inner_bias is None:
        y = y + conv.bias.view(1, -1, 1, 1)
    return y


def set_fused(model: nn.Module, enabled: bool) -> int:
    """Switch the fused path on or off in every fusable binary conv of ``model``; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and hasattr(m, "fused") and can_fuse(m):  # type: ignore[arg-type]
            m.fused = enabled
            count += 1
    return count
