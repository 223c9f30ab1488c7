"""``BinaryConv2d``: ``nn.Conv2d`` with binary weights and/or inputs and an XNOR-Net(++) scale factor.

``out = (sign(I) (*) sign(W - mean_dim1 W)) . Gamma`` (+ bias). Zero padding is applied after the sign,
so padded positions contribute 0 (neither +1 nor -1) to the binary sums, exactly as a float conv of the
sign map does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .fused import can_fuse, fused_binary_conv_forward
from .scale import SPATIAL_SCALES, build_scale, check_scale
from .sign import get_estimator, weight_sign

__all__ = ["BinaryConv2d"]


class BinaryConv2d(nn.Conv2d):
    """A ``Conv2d`` (same arguments, same init when nothing is binarized) that can binarize.

    Args (beyond ``nn.Conv2d``'s):
        binarize_weights: forward ``sign(W - mean_dim1(W))`` (see ``centre_weights``) instead of ``W``;
            latent weights then start uniform in ``[0, 1e-3)`` as in the original project.
        binarize_inputs: forward ``sign(x)`` of the input, with the ``estimator``'s gradient.
        scale: one of ``xnorpp.nn.SCALES`` (``none``, ``xnor``, ``xnor_k``, ``channel``, ``full``,
            ``channel_spatial``, ``rank1``).
        estimator: activation gradient, one of ``xnorpp.nn.ACTIVATION_ESTIMATORS``.
        output_size: ``(H_out, W_out)``, required by the spatial scales.
        centre_weights: centre latent weights over input channels before the sign.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        binarize_weights: bool = True,
        binarize_inputs: bool = True,
        scale: str = "none",
        estimator: str = "ste",
        output_size: tuple[int, int] | None = None,
        centre_weights: bool = True,
    ) -> None:
        check_scale(scale)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype,
        )  # fmt: skip
        self.binarize_weights = bool(binarize_weights)
        self.binarize_inputs = bool(binarize_inputs)
        self.scale = scale
        self.estimator = estimator
        self._sign = get_estimator(estimator)
        self.centre_weights = bool(centre_weights)
        if scale == "xnor_k" and not self.binarize_inputs:
            raise ValueError(
                "scale 'xnor_k' approximates |input| and needs binarize_inputs=True; "
                "use scale 'xnor' for weight-only binarization"
            )
        if scale in SPATIAL_SCALES and output_size is None:
            raise ValueError(
                f"scale {scale!r} depends on the output resolution: pass output_size=(H_out, W_out)"
            )
        self.output_size = tuple(output_size) if output_size is not None else None
        self.scale_factor = build_scale(
            scale, out_channels, self.output_size, self.kernel_size, self.stride, self.padding, self.dilation
        )
        if device is not None or dtype is not None:
            self.scale_factor.to(device=device, dtype=dtype)
        if self.binarize_weights:
            with torch.no_grad():
                self.weight.uniform_(0.0, 1e-3)
        # sign -> conv -> Gamma in one autograd node saving bits (xnorpp.nn.fused); False: unfused path
        self.fused: bool = can_fuse(self)

    @property
    def is_binary(self) -> bool:
        """True when weights or inputs are binarized."""
        return self.binarize_weights or self.binarize_inputs

    def binary_weight(self) -> Tensor:
        """The weight the convolution uses: ``sign`` of the (centred) latent weight, or the weight."""
        if not self.binarize_weights:
            return self.weight
        return weight_sign(self.weight, self.centre_weights)

    def scaled_weight_source(self) -> Tensor:
        """The real tensor whose sign is taken (the centred latent weight), for analytic scales."""
        if self.binarize_weights and self.centre_weights:
            return self.weight - self.weight.mean(dim=1, keepdim=True)
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return fused_binary_conv_forward(self, x)
        xb = self._sign(x) if self.binarize_inputs else x
        w = self.binary_weight()
        if self.scale == "none":
            return self._conv_forward(xb, w, self.bias)
        y = self._conv_forward(xb, w, None)
        y = self.scale_factor(y, self.scaled_weight_source(), x)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, binarize_weights={self.binarize_weights}, "
            f"binarize_inputs={self.binarize_inputs}, scale={self.scale!r}, estimator={self.estimator!r}"
        )
