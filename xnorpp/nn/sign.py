"""Sign functions with straight-through estimators (STE).

Forward of every binarizer is ``sign(x)`` with the convention ``sign(0) = +1``: the output is always
exactly +-1 (``torch.sign`` would give 0, which is frequent in bf16/fp16 and would make a "binary"
tensor ternary). The estimators differ only in the backward pass:

- ``ste``: clipped identity (BNN, XNOR-Net): ``d/dx = 1 if -1 <= x <= 1 else 0`` (inclusive window,
  as in the original project). Saves a bool mask for backward, not the input.
- ``approx_sign``: Bi-Real Net's piecewise-polynomial derivative (Liu et al. 2018, arXiv 1808.00278):
  ``d/dx = 2 - 2|x|`` for ``|x| <= 1`` else 0.
- ``identity``: plain straight-through (``d/dx = 1`` everywhere), for ablations.
- ``swish_sign``: BNN+'s SignSwish derivative (Darabi et al. 2018, arXiv 1812.11800), a smooth bump of
  width ``~1/beta``: ``d/dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))``, ``beta = 5``.

Weights use :func:`weight_sign`: centre the latent weight over the input-channel dimension
(``c = W - mean_dim1(W)``, in the graph), forward ``sign(c)``, backward the gradient of
``clamp(c, -1, 1)`` (the original project's scheme). :func:`magnitude_aware_sign` is Bi-Real Net's weight
binarizer, ``mean|W| sign(W)`` per output filter with the mean held constant in the backward pass.

Each binarizer also exists as a small named module (:class:`SteSign`, :class:`ApproxSign`,
:class:`SwishSign`, :class:`MagnitudeAwareSign`, the names larq gives them) that carries its bit width
and alias, registered in :data:`QUANTIZERS`; configs pick activation gradients by the names of
:data:`ACTIVATION_ESTIMATORS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..registry import Registry

__all__ = [
    "ACTIVATION_ESTIMATORS",
    "QUANTIZERS",
    "ApproxSign",
    "MagnitudeAwareSign",
    "Quantizer",
    "SteSign",
    "SwishSign",
    "approx_sign",
    "binary_sign",
    "centre_weight",
    "get_estimator",
    "identity_sign",
    "magnitude_aware_sign",
    "sign_ste",
    "swish_sign",
    "weight_sign",
]


def binary_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0`` else ``-1``, in ``x``'s dtype (never 0, unlike ``torch.sign``).

    Computed as ``sign(sign(x) + 0.5)``: three float passes, several times faster on CPU than
    ``torch.where(x >= 0, 1, -1)``, whose comparison writes a bool tensor.
    """
    return torch.sign(x).add_(0.5).sign_()


class _SignSTE(torch.autograd.Function):
    """sign forward, clipped-identity backward; keeps only a bool mask ``|x| <= 1`` for backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x.abs() <= 1)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype)


class _ApproxSign(torch.autograd.Function):
    """sign forward, Bi-Real ``2 - 2|x|`` backward inside ``|x| <= 1``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * x.abs()).clamp_min(0.0)


class _IdentitySign(torch.autograd.Function):
    """sign forward, identity backward; saves nothing."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def sign_ste(x: Tensor) -> Tensor:
    """Binary activation: ``sign(x)`` forward, gradient passed where ``-1 <= x <= 1``."""
    return _SignSTE.apply(x)


def approx_sign(x: Tensor) -> Tensor:
    """Binary activation with Bi-Real Net's ApproxSign gradient ``2 - 2|x|`` on ``|x| <= 1``."""
    return _ApproxSign.apply(x)


def identity_sign(x: Tensor) -> Tensor:
    """Binary activation with an unclipped straight-through gradient."""
    return _IdentitySign.apply(x)


class _WeightSign(torch.autograd.Function):
    """sign forward, gradient of ``clamp(c, -1, 1)`` backward (inclusive window, like ``clamp``)."""

    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(c.abs() <= 1)
        return binary_sign(c)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype)


def centre_weight(weight: Tensor) -> Tensor:
    """``W - mean(W, dim=1)``: the latent weight centred over input channels, per filter and tap."""
    return weight - weight.mean(dim=1, keepdim=True)


def weight_sign(weight: Tensor, centre: bool = True) -> Tensor:
    """Binary weight ``sign(c)``, ``c = W - mean_dim1(W)`` if ``centre``; backward of ``clamp(c, -1, 1)``.

    The centring stays in the autograd graph, so the latent weight receives
    ``g - mean_dim1(g)`` where ``g`` is the clipped straight-through gradient.
    """
    c = centre_weight(weight) if centre else weight
    return _WeightSign.apply(c)


class _SwishSign(torch.autograd.Function):
    """sign forward, SignSwish backward ``beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))``."""

    @staticmethod
    def forward(ctx, x: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.beta = float(beta)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        bx = (ctx.beta * x).clamp(-80.0, 80.0)  # cosh overflows fp32 beyond ~89; the gradient is 0 there
        return grad * ctx.beta * (2.0 - bx * torch.tanh(bx / 2)) / (1.0 + torch.cosh(bx)), None


def swish_sign(x: Tensor, beta: float = 5.0) -> Tensor:
    """Binary activation with BNN+'s SignSwish gradient: ``beta`` at 0, slightly negative lobes around
    ``|x| = 3.45 / beta``, vanishing beyond ``|x| ~ 8 / beta``."""
    return _SwishSign.apply(x, beta)


def magnitude_aware_sign(weight: Tensor, clip_value: float = 1.0) -> Tensor:
    """Bi-Real Net's magnitude-aware binary weight (Liu et al. 2018): ``alpha sign(W)``, ``alpha = mean|W|``
    per output filter (dim 0), the straight-through gradient clipped at ``|W| <= clip_value`` and scaled by
    ``alpha``, which is a constant of the backward pass (larq's ``MagnitudeAwareSign``).

    A per-filter factor commutes with a convolution, so a :class:`~xnorpp.nn.BinaryConv2d` reproduces it
    exactly with ``scale="magnitude_aware"`` (the factor on the output, the weights stay +-1 for export).
    """
    dims = tuple(range(1, weight.dim()))
    alpha = weight.detach().abs().mean(dim=dims, keepdim=True)
    inside = (weight.detach().abs() <= clip_value).to(weight.dtype)
    ste = weight * inside + (binary_sign(weight.detach()) - weight * inside).detach()
    return alpha * ste


ACTIVATION_ESTIMATORS: Registry[Callable[[Tensor], Tensor]] = Registry(
    "activation estimator", "model.estimator", "xnorpp.nn.ACTIVATION_ESTIMATORS"
)
ACTIVATION_ESTIMATORS.register("ste")(sign_ste)
ACTIVATION_ESTIMATORS.register("approx_sign")(approx_sign)
ACTIVATION_ESTIMATORS.register("identity")(identity_sign)
ACTIVATION_ESTIMATORS.register("swish_sign")(swish_sign)


def get_estimator(name: str) -> Callable[[Tensor], Tensor]:
    """The activation binarizer registered under ``name`` (see :data:`ACTIVATION_ESTIMATORS`)."""
    return ACTIVATION_ESTIMATORS.get(name)


# ------------------------------------------------------------------------------- named quantizers
QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer", "a quantizer alias", "xnorpp.nn.QUANTIZERS")


class Quantizer(nn.Module):
    """A binarizer as a module: ``precision`` (bits) and ``alias`` (the registry name) for configs and
    summaries; ``forward`` is the function of the same name. ``estimator`` names the equivalent choice of
    :data:`ACTIVATION_ESTIMATORS` (``model.estimator``), ``None`` for weight quantizers."""

    precision: int = 1
    alias: str = ""
    estimator: str | None = None

    def extra_repr(self) -> str:
        return f"alias={self.alias!r}, precision={self.precision}"


@QUANTIZERS.register("ste_sign")
class SteSign(Quantizer):
    """``sign(x)``, gradient 1 where ``|x| <= clip_value`` (BNN, Hubara et al. 2016); ``None``: unclipped.

    ``clip_value=1`` is the estimator ``ste``, ``None`` the estimator ``identity``.
    """

    alias = "ste_sign"

    def __init__(self, clip_value: float | None = 1.0) -> None:
        super().__init__()
        if clip_value is not None and not clip_value > 0:
            raise ValueError(f"clip_value must be positive or None, got {clip_value}")
        self.clip_value = None if clip_value is None else float(clip_value)
        self.estimator = {1.0: "ste", None: "identity"}.get(self.clip_value)

    def forward(self, x: Tensor) -> Tensor:
        if self.clip_value is None:
            return identity_sign(x)
        if self.clip_value == 1.0:
            return sign_ste(x)
        inside = (x.detach().abs() <= self.clip_value).to(x.dtype)
        return x * inside + (binary_sign(x.detach()) - x * inside).detach()


@QUANTIZERS.register("approx_sign")
class ApproxSign(Quantizer):
    """``sign(x)`` with Bi-Real Net's ApproxSign gradient ``2 - 2|x|`` on ``|x| <= 1`` (estimator ``approx_sign``)."""

    alias = "approx_sign"
    estimator = "approx_sign"

    def forward(self, x: Tensor) -> Tensor:
        return approx_sign(x)


@QUANTIZERS.register("swish_sign")
class SwishSign(Quantizer):
    """``sign(x)`` with BNN+'s SignSwish gradient; ``beta`` sets its width (estimator ``swish_sign`` at 5)."""

    alias = "swish_sign"

    def __init__(self, beta: float = 5.0) -> None:
        super().__init__()
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a positive number, got {beta}")
        self.beta = float(beta)
        self.estimator = "swish_sign" if self.beta == 5.0 else None

    def forward(self, x: Tensor) -> Tensor:
        return swish_sign(x, self.beta)


@QUANTIZERS.register("magnitude_aware_sign")
class MagnitudeAwareSign(Quantizer):
    """Bi-Real Net's weight binarizer ``mean|W| sign(W)`` per output filter (:func:`magnitude_aware_sign`);
    in a ``BinaryConv2d`` it is ``scale="magnitude_aware"``."""

    alias = "magnitude_aware_sign"

    def __init__(self, clip_value: float = 1.0) -> None:
        super().__init__()
        self.clip_value = float(clip_value)

    def forward(self, weight: Tensor) -> Tensor:
        return magnitude_aware_sign(weight, self.clip_value)
