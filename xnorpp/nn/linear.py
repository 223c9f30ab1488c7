"""``BinaryLinear``: a fully connected layer computed as a 1x1 :class:`~xnorpp.nn.BinaryConv2d`.

``y = x W^T + b`` of ``nn.Linear`` equals a 1x1 convolution of ``x`` viewed as ``(N, in, 1, 1)`` with the
weight ``(out, in, 1, 1)``, so a binary linear layer is the binary convolution itself: the same signs,
estimators, scales (per output feature), fused path, parameter groups, health metrics and export.
Inputs of any shape ``(..., in_features)`` work, as with ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .conv import BinaryConv2d

__all__ = ["BinaryLinear"]


class BinaryLinear(BinaryConv2d):
    """``nn.Linear(in_features, out_features, bias)`` with binary weights and/or inputs.

    The weight has the conv shape ``(out_features, in_features, 1, 1)``; :meth:`from_linear` copies an
    ``nn.Linear``'s weight and bias into it. Spatial scales are 1x1 here (a per-feature factor).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        **binary: Any,
    ) -> None:
        binary.setdefault("output_size", (1, 1))
        super().__init__(in_features, out_features, 1, bias=bias, device=device, dtype=dtype, **binary)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, **binary: Any) -> BinaryLinear:
        """A binary copy of ``linear``: same features, device and dtype; its weight and bias copied."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=w.device, dtype=w.dtype, **binary)  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(w.view_as(layer.weight))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = super().forward(x.reshape(-1, self.in_features, 1, 1))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()
