"""A lean binary convolution: ``sign(x) -> conv -> Gamma`` in one autograd node that saves codes.

The unfused path (``sign_ste`` then ``F.conv2d`` then ``y * Gamma``) keeps, per input element, a bool
mask (1 byte) for the STE and the fp32 ``+-1`` input (4 bytes) for the weight gradient, plus the fp32
conv output ``y`` (4 bytes per output element) for ``dGamma``, and builds the binary weight through
four autograd nodes (centring, sign) that keep their own copies. :class:`BinaryInputConv2dFn` keeps:

- one ``int8`` code per input element, ``sign * (1 + window)`` (:func:`sign_code`): its sign is the
  binary value (``x >= 0`` gives ``+1``, so ``sign(0) = +1`` as :func:`~xnorpp.nn.sign.binary_sign`),
  its magnitude the STE window ``|x| <= 1`` (inclusive); backward rebuilds the ``+-1`` input and feeds
  ``aten.convolution_backward`` (what ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` call) once
  for both gradients;
- for binary weights, the latent weight goes in and is centred and binarized inside the node; the
  same ``int8`` code of ``c = W - mean_dim1(W)`` is kept instead of the fp32 ``+-1`` weight and the
  clamp mask, and backward applies ``clamp``'s and the centring's gradients in place;
- when ``Gamma`` is fused and the weights are binary, ``y`` as ``int16``: ``y`` is then an exact integer
  sum of ``+-1`` products with ``|y| <= C_in/groups * kh * kw`` (4608 in ResNet-18), stored losslessly.

On CPU in fp32, with binary weights and no bias, the forward conv runs as an exact ``int8`` conv
(:mod:`xnorpp.nn.int8_conv`, 1.8-3x faster than the fp32 conv, same values): the input is then coded
once into a ``uint8`` conv operand and the saved ``int8`` code in one pass (:func:`sign_code_u8`).

Every step is a float operation writing floats or a cast (on CPU several times faster than comparisons
that write bools or ``torch.where``). Forward values and gradients are bit-identical to the unfused
path (same arithmetic on the same values, in the same order), in fp32 and under autocast. Under
``torch.autocast`` the conv runs in the autocast dtype: the ``+-1`` operands are exact, but sums above
256 (bf16) or 2048 (fp16) are rounded to that dtype's grid (steps of 2, 4, ... 32 for bf16 between 256
and 8192), in the fused and unfused paths alike.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from .int8_conv import binary_conv2d_int8, int8_conv_applies
from .kernels import (
    code_sign,
    gamma_backward,
    gamma_forward,
    gamma_forward_in_c,
    layout_like,
    masked_grad,
    memory_format_of,
    sign_code,
    sign_code_u8,
)
from .scale import LearnedScale, ScaleFactor, conv_output_size
from .sign import centre_weight

__all__ = [
    "BinaryInputConv2dFn",
    "binary_input_conv2d",
    "can_fuse",
    "fused_binary_conv_forward",
    "has_fused",
    "set_fused",
    "warm_up_fused",
]

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
    centre_weights: bool
    estimator: str
    scale: str
    scale_factor: ScaleFactor

    def scaled_weight_source(self) -> Tensor: ...


def _conv_output_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The layout PyTorch's CPU conv gives its output: channels-last if the input or the weight is."""
    if torch.channels_last in (memory_format_of(x), memory_format_of(weight)):
        return torch.channels_last
    return torch.contiguous_format


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the conv runs in: the autocast dtype when autocast is on for ``x``'s device."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


class BinaryInputConv2dFn(torch.autograd.Function):
    """``out = conv2d(sign(x), w, bias) [* gamma]`` with the clipped STE; saves codes, not fp32 tensors.

    Inputs: ``x`` (real), ``weight`` (the latent weight when ``binarize_weight``, else the weight the
    conv uses), ``bias`` (added inside the conv, only without ``gamma``), ``gamma`` (``Gamma``
    broadcastable to the output's (C, H, W), or ``None``), the conv's ``stride``, ``padding`` (ints),
    ``dilation``, ``groups``; ``binarize_weight``: the conv uses ``sign(c)``, ``c = W - mean_dim1(W)``
    (``centre``) or ``c = W``, with the gradient of ``clamp(c, -1, 1)`` as
    :func:`~xnorpp.nn.sign.weight_sign` (then only the weight's code and an ``int16`` ``y`` are kept).
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
        binarize_weight: bool,
        centre: bool,
    ) -> Tensor:
        if bias is not None and gamma is not None:
            raise ValueError("pass either bias (added inside the conv) or gamma, not both")
        dtype = _compute_dtype(x)
        out_size = (
            conv_output_size(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
            if x.dim() == 4
            else ()
        )
        if binarize_weight and int8_conv_applies(x, weight, dtype, out_size, groups, bias):
            xu, code = sign_code_u8(x)  # exact int8 conv, fp32 result
            w, saved_w = sign_code(centre_weight(weight) if centre else weight, torch.int8)
            y = binary_conv2d_int8(xu, w, stride, padding, dilation, groups, None)  # channels-last
            del xu, w
            fmt = _conv_output_format(x, weight)
        else:
            xb, code = sign_code(x, dtype)
            if binarize_weight:
                w, saved_w = sign_code(centre_weight(weight) if centre else weight, dtype)
            else:
                w, saved_w = weight.to(dtype), weight
            y = F.conv2d(xb, w, None if bias is None else bias.to(dtype), stride, padding, dilation, groups)
            del xb, w
            fmt = memory_format_of(y)
        saved_y = None
        exact = binarize_weight and math.prod(weight.shape[1:]) <= _INT16_SAFE
        if gamma is not None and gamma.requires_grad and exact:  # y is an exact integer sum: kept as int16
            g = gamma.to(y.dtype)
            if not gamma_forward_in_c(y, g):
                y = y.contiguous(memory_format=fmt)  # here, so that the channels-last y is freed
            out, saved_y = gamma_forward(y, g, fmt)
        else:
            out = y = y.contiguous(memory_format=fmt)
            if gamma is not None:
                g = layout_like(gamma.to(y.dtype), y)
                out, saved_y = (y * g, y) if gamma.requires_grad else (y.mul_(g), None)
        ctx.save_for_backward(code, saved_w, gamma, saved_y)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.meta = (
            binarize_weight, centre, dtype, x.dtype, weight.dtype,
            None if bias is None else list(bias.shape),
        )  # fmt: skip
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        code, saved_w, gamma, saved_y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        binarize_weight, centre, dtype, x_dtype, w_dtype, bias_shape = ctx.meta
        need_x, need_w, need_b, need_g = ctx.needs_input_grad[:4]
        grad_gamma = None
        if gamma is not None:
            grad_gamma, grad = gamma_backward(grad, saved_y, gamma, need_g)
        grad_x = grad_w = grad_b = None
        if need_x or need_w or need_b:
            w = code_sign(saved_w, dtype) if binarize_weight else saved_w.to(dtype)
            xb = code_sign(code, dtype)
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, xb, w, bias_shape, stride, padding, dilation, False, [0] * len(stride), groups,
                [need_x, need_w, need_b],
            )  # fmt: skip
            del xb, w
            if grad_x is not None:
                grad_x = masked_grad(grad_x, code, x_dtype)
            if grad_w is not None:
                if not binarize_weight:
                    grad_w = grad_w.to(w_dtype)
                else:  # clamp's gradient, then the centring's: g - mean_dim1(g)
                    grad_w = masked_grad(grad_w, saved_w, w_dtype)
                    if centre:  # in autograd's order of operations, so bit-identical to it
                        n = grad_w.shape[1]
                        grad_w = grad_w.add_(grad_w.sum(1, keepdim=True).neg_().div_(n))
            if grad_b is not None:
                grad_b = grad_b.to(w_dtype)
        return grad_x, grad_w, grad_b, grad_gamma, None, None, None, None, None, None


def binary_input_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    gamma: Tensor | None = None,
    stride: tuple[int, ...] = (1, 1),
    padding: tuple[int, ...] = (0, 0),
    dilation: tuple[int, ...] = (1, 1),
    groups: int = 1,
    binarize_weight: bool = False,
    centre: bool = True,
) -> Tensor:
    """``conv2d(sign_ste(x), w, bias) [* gamma]`` in one node (see :class:`BinaryInputConv2dFn`).

    ``w`` is ``weight_sign(weight, centre)`` if ``binarize_weight``, else ``weight``.
    """
    return BinaryInputConv2dFn.apply(
        x, weight, bias, gamma, stride, padding, dilation, groups, binarize_weight, centre
    )


def can_fuse(conv: _ConvLike) -> bool:
    """Whether ``conv`` can take the fused path: binary inputs, ``ste``, zero padding given as ints."""
    padding_ints = isinstance(conv.padding, tuple) and all(isinstance(p, int) for p in conv.padding)
    return conv.binarize_inputs and conv.estimator == "ste" and conv.padding_mode == "zeros" and padding_ints


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
    if learned and scale.out_size is not None:
        out_size = conv_output_size(x.shape[-2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
        if out_size != scale.out_size:
            scale(x.new_empty(0, conv.out_channels, *out_size), conv.weight, x)  # raises its error
    gamma = scale.gamma_tensor() if learned else None
    inner_bias = conv.bias if conv.scale == "none" else None  # as the unfused path: in the conv
    y = binary_input_conv2d(
        x, conv.weight, inner_bias, gamma, conv.stride, conv.padding, conv.dilation, conv.groups,
        conv.binarize_weights, conv.centre_weights,
    )  # fmt: skip
    if not learned and conv.scale != "none":
        y = scale(y, conv.scaled_weight_source(), x)
    if conv.bias is not None and inner_bias is None:
        y = y + conv.bias.view(1, -1, 1, 1)
    return y


def has_fused(model: nn.Module) -> bool:
    """Whether any binary conv of ``model`` takes the fused path."""
    return any(getattr(m, "fused", False) for m in model.modules())


def set_fused(model: nn.Module, enabled: bool) -> int:
    """Switch the fused path on or off in every fusable binary conv of ``model``; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and hasattr(m, "fused") and can_fuse(m):  # type: ignore[arg-type]
            m.fused = enabled
            count += 1
    return count


def warm_up_fused(device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> None:
    """One tiny forward and backward of the fused node on ``device`` (under autocast to
    ``autocast_dtype`` if given), before training.

    It compiles the sign kernels the binary layers will use (``trainer.kernels=compiled``; on CPU it also
    builds or loads the C kernels of :mod:`xnorpp.nn.native`) and probes the ``int8`` conv, so the first
    training step takes no compile time, and so the compiler's own host memory (~80 MB, plus its
    modules) is allocated before the activations instead of between them in the CPU heap. The trainer
    and the benchmark call it for CPU runs only: on CUDA the activations are not in that heap, and
    compiling on the first real activation measured ~3% faster steps (H200, fp32) than after this
    warm-up. Fixed values: the random number streams are untouched.
    """
    dev = torch.device(device)
    # activation-sized: the compiler tunes its kernels for the sizes it first sees
    x = torch.linspace(-2, 2, 8 * 64 * 32 * 32, device=dev).view(8, 64, 32, 32)
    w = torch.linspace(-1, 1, 64 * 64 * 3 * 3, device=dev).view(64, 64, 3, 3).requires_grad_()
    gamma = torch.ones(64, 1, 1, device=dev, requires_grad=True)
    # both layouts: on CPU an NCHW input's int8 operand comes from a C kernel, a channels-last one's not
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.contiguous(memory_format=fmt).requires_grad_()
        with torch.autocast(
            dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            out = binary_input_conv2d(xf, w, None, gamma, (1, 1), (1, 1), (1, 1), 1, True, True)
        out.float().sum().backward()
