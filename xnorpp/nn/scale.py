"""Scale factors applied to a binary convolution's output.

XNOR-Net (Rastegari et al. 2016, arXiv 1603.05279): ``I * W ~ (sign(I) (*) sign(W)) . K . alpha`` with
``alpha = mean|W|`` per output filter and ``K`` the box-filtered channel mean of ``|I|``.

XNOR-Net++ (Bulat & Tzimiropoulos 2019, arXiv 1909.13863) learns one factor ``Gamma`` by backprop:

=================  ====  ========================================  ===========================
name               case  Gamma                                     parameters per layer
=================  ====  ========================================  ===========================
``channel``        1     ``alpha`` (C,1,1)                         ``C``
``full``           2     one value per output element (C,H,W)      ``C*H*W``
``channel_spatial`` 3    ``alpha (C,1,1) * beta (1,H,W)``          ``C + H*W``
``rank1``          4     ``alpha (C,1,1) * beta (1,H,1) * gamma (1,1,W)``  ``C + H + W``
=================  ====  ========================================  ===========================

``magnitude_aware`` is XNOR-Net's ``alpha`` held constant in the backward pass: Bi-Real Net's
magnitude-aware binary weight ``alpha sign(W)`` (larq's ``MagnitudeAwareSign``, also ReActNet's), moved
from the weight to the output, where a per-filter factor gives the same values and gradients.

All learned factors start at 1. ``Gamma`` is formed once from its small factors and multiplies the
activation once, so only one activation-sized buffer is kept for backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = [
    "ANALYTIC_SCALES",
    "LEARNED_SCALES",
    "SCALES",
    "SPATIAL_SCALES",
    "LearnedScale",
    "NoScale",
    "ScaleFactor",
    "XnorScale",
    "build_scale",
    "check_scale",
    "conv_output_size",
]


def conv_output_size(
    size: tuple[int, int], kernel_size: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1
) -> tuple[int, int]:
    """Spatial output size of a convolution or pooling: ``floor((H + 2p - d(k-1) - 1) / s) + 1``."""
    k, s, p, d = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    return tuple((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))  # type: ignore[return-value]


LEARNED_SCALES: tuple[str, ...] = ("channel", "full", "channel_spatial", "rank1")
SPATIAL_SCALES: tuple[str, ...] = ("full", "channel_spatial", "rank1")
SCALES: tuple[str, ...] = ("none", "xnor", "xnor_k", *LEARNED_SCALES, "magnitude_aware")
ANALYTIC_SCALES: tuple[str, ...] = ("xnor", "xnor_k", "magnitude_aware")  # alpha = mean|W|, no parameters
SCALE_CASES: dict[str, int] = {"channel": 1, "full": 2, "channel_spatial": 3, "rank1": 4}


def check_scale(name: str) -> str:
    """Return ``name`` if it is a known scale, else raise a ``ValueError`` listing the valid ones."""
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; valid choices: {', '.join(SCALES)}")
    return name


class ScaleFactor(nn.Module):
    """Base: ``forward(y, weight, x)`` scales the binary conv output ``y``.

    ``weight`` is the real-valued tensor that was binarized (the centred latent weight) and ``x`` the
    real-valued input before ``sign``; analytic scales use them, learned ones ignore them.
    """

    name: str = "none"

    def forward(self, y: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError


class NoScale(ScaleFactor):
    """Identity: the binary convolution's integer-valued output is used as is."""

    def forward(self, y: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        return y


class XnorScale(ScaleFactor):
    """XNOR-Net's analytic scale: ``alpha = mean|W|`` per output filter, optionally times ``K``.

    ``K = boxfilter(mean_c |I|)`` with the convolution's own kernel size, stride, padding and dilation
    (zero padding counted in the mean, as a convolution with a ``1/(kh*kw)`` kernel). ``detach``: no
    gradient through ``alpha`` (the ``magnitude_aware`` scale).
    """

    def __init__(
        self,
        with_k: bool = False,
        kernel_size: tuple[int, int] = (1, 1),
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        detach: bool = False,
    ) -> None:
        super().__init__()
        if with_k and detach:
            raise ValueError("the magnitude-aware scale has no K map: pass with_k=False with detach=True")
        self.with_k = with_k
        self.detach = detach
        self.name = "magnitude_aware" if detach else "xnor_k" if with_k else "xnor"
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation

    def forward(self, y: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        alpha = weight.abs().mean(dim=(1, 2, 3)).view(1, -1, 1, 1)
        if self.detach:
            alpha = alpha.detach()
        if not self.with_k:
            return y * alpha.to(y.dtype)
        a = x.abs().mean(dim=1, keepdim=True)
        box = a.new_full((1, 1, *self.kernel_size), 1.0 / (self.kernel_size[0] * self.kernel_size[1]))
        k = F.conv2d(a, box, stride=self.stride, padding=self.padding, dilation=self.dilation)
        return y * (alpha * k).to(y.dtype)


class LearnedScale(ScaleFactor):
    """XNOR-Net++ learned ``Gamma`` of one of the shapes in :data:`LEARNED_SCALES`, all ones at init.

    ``out_size = (H_out, W_out)`` is required by the spatial shapes; a forward whose output has another
    resolution raises a ``ValueError`` naming both sizes.
    """

    def __init__(self, kind: str, channels: int, out_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if kind not in LEARNED_SCALES:
            raise ValueError(f"unknown learned scale {kind!r}; valid choices: {', '.join(LEARNED_SCALES)}")
        if kind in SPATIAL_SCALES and out_size is None:
            raise ValueError(
                f"scale {kind!r} depends on the output resolution: pass output_size=(H_out, W_out) "
                "(the models derive it from their input_size)"
            )
        self.name = kind
        self.out_size = tuple(out_size) if out_size is not None and kind in SPATIAL_SCALES else None
        h, w = self.out_size if self.out_size is not None else (1, 1)
        if kind == "full":
            self.alpha = nn.Parameter(torch.ones(channels, h, w))
        else:
            self.alpha = nn.Parameter(torch.ones(channels, 1, 1))
        if kind == "channel_spatial":
            self.beta = nn.Parameter(torch.ones(1, h, w))
        elif kind == "rank1":
            self.beta = nn.Parameter(torch.ones(1, h, 1))
            self.gamma = nn.Parameter(torch.ones(1, 1, w))

    def gamma_tensor(self) -> Tensor:
        """``Gamma`` as one tensor of shape (C,1,1) or (C,H,W)."""
        g = self.alpha
        if self.name == "channel_spatial":
            g = g * self.beta
        elif self.name == "rank1":
            g = g * self.beta * self.gamma
        return g

    def forward(self, y: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        if self.out_size is not None and tuple(y.shape[-2:]) != self.out_size:
            h, w = self.out_size
            raise ValueError(
                f"scale {self.name!r} was built for a {h}x{w} output but this forward gives "
                f"{y.shape[-2]}x{y.shape[-1]}: build the model with the input size you feed it "
                "(input_size / data.image_size), or use scale=channel which has no spatial shape"
            )
        return y * self.gamma_tensor().to(y.dtype)

    def extra_repr(self) -> str:
        size = f", out_size={self.out_size}" if self.out_size else ""
        return f"kind={self.name!r} (case {SCALE_CASES[self.name]}){size}"


def build_scale(
    name: str,
    channels: int,
    out_size: tuple[int, int] | None = None,
    kernel_size: tuple[int, int] = (1, 1),
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> ScaleFactor:
    """Factory for every name in :data:`SCALES`."""
    check_scale(name)
    if name == "none":
        return NoScale()
    if name in ANALYTIC_SCALES:
        return XnorScale(
            name == "xnor_k", kernel_size, stride, padding, dilation, detach=name == "magnitude_aware"
        )
    return LearnedScale(name, channels, out_size)
