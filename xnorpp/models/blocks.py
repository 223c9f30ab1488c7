"""Residual blocks of the binary ResNets, one per method, chosen by name (``model.block``).

All blocks take the same arguments and keep the same skeleton around them (stem, four stages, the
avg-pool + 1x1 conv + BN downsample shortcut, head), so methods differ only where their papers do:

- ``preact``: the original XNOR-Net++ project's pre-activation block (see
  :mod:`xnorpp.models.resnet_preact`): ``BN -> binconv -> ReLU -> BN -> binconv -> BN``, one shortcut
  around the pair.
- ``bireal``: Bi-Real Net (Liu et al., ECCV 2018, arXiv 1808.00278): a real-valued shortcut around
  EVERY binary conv, ``x -> sign -> conv -> BN -> + x``, no other nonlinearity. With real inputs
  (``fp``, ``weight_only``) the sign becomes ``clip(x, -1, 1)``, the activation of Bi-Real's real-valued
  initialisation network.
- ``reactnet``: ReActNet's block on the same layout (Liu et al., ECCV 2020, arXiv 2003.03488): RSign, a
  learned per-channel threshold before the sign (:class:`LearnableShift` then the conv's own sign), and
  RPReLU, ``PReLU(x - gamma) + zeta`` per channel, after each shortcut addition.

``bireal`` and ``reactnet`` binarize weights without centring (``sign(W)``, as their papers) and their
stem has no ReLU (a ReLU before the first sign would make every input +1); ``preact`` centres.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..nn import BinaryConv2d, conv_output_size
from ..registry import Registry

if TYPE_CHECKING:
    from .variants import Binarization

__all__ = [
    "BLOCKS",
    "BiRealBlock",
    "LearnableShift",
    "PreActBasicBlock",
    "RPReLU",
    "ReActBlock",
    "binary_conv",
    "downsample_shortcut",
]

BLOCKS: Registry[type[nn.Module]] = Registry("block", "model.block", "xnorpp.models.BLOCKS")


def binary_conv(
    cin: int,
    cout: int,
    k: int,
    stride: int,
    in_size: tuple[int, int],
    weights: bool,
    inputs: bool,
    scale: str,
    estimator: str,
    centre: bool = True,
) -> BinaryConv2d:
    """A ``k x k`` conv (padding ``k // 2``, no bias) binarizing its weights and/or inputs; real when
    neither, then without scale. Spatial scales are sized from ``in_size``."""
    pad = k // 2
    out_size = conv_output_size(in_size, k, stride, pad)
    return BinaryConv2d(
        cin, cout, k, stride=stride, padding=pad, bias=False,
        binarize_weights=weights, binarize_inputs=inputs,
        scale=scale if (weights or inputs) else "none", estimator=estimator, output_size=out_size,
        centre_weights=centre,
    )  # fmt: skip


def downsample_shortcut(
    cin: int,
    cout: int,
    stride: int,
    out_size: tuple[int, int],
    variant: Binarization,
    scale: str,
    estimator: str,
    centre: bool,
) -> nn.Sequential:
    """avg-pool 2x2 (stride ``stride``) -> 1x1 conv -> BN; the conv is binary only in variants whose
    ``downsample`` is binary. ``ceil_mode`` keeps odd sizes aligned with the block's strided conv."""
    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
    binary = variant.downsample
    conv = binary_conv(cin, cout, 1, 1, out_size, variant.weights and binary, variant.inputs and binary,
                       scale, estimator, centre)  # fmt: skip
    return nn.Sequential(pool, conv, nn.BatchNorm2d(cout))


@BLOCKS.register("preact")
class PreActBasicBlock(nn.Module):
    """The original project's pre-activation basic block with binary 3x3 convolutions::

    identity = x; h = BN1(x)
    if downsample: identity = downsample(h)        # the shortcut sees the normalised input
    h = ReLU(binconv1(h)); h = BN2(h); h = binconv2(h); h = BN3(h)
    out = ReLU(h + identity)
    """

    expansion = 1
    stem_relu = True
    centre_weights = True

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        in_size: tuple[int, int],
        variant: Binarization,
        scale: str,
        estimator: str,
        centre: bool = True,
    ) -> None:
        super().__init__()
        w, a = variant.weights, variant.inputs
        self.out_size = conv_output_size(in_size, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = binary_conv(cin, cout, 3, stride, in_size, w, a, scale, estimator, centre)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = binary_conv(cout, cout, 3, 1, self.out_size, w, a, scale, estimator, centre)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = downsample_shortcut(cin, cout, stride, self.out_size, variant, scale, estimator,
                                                  centre)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        h = self.bn1(x)
        if self.downsample is not None:
            identity = self.downsample(h)
        h = self.relu(self.conv1(h))
        h = self.bn2(h)
        h = self.conv2(h)
        h = self.bn3(h)
        return self.relu(h + identity)


@BLOCKS.register("bireal")
class BiRealBlock(nn.Module):
    """Bi-Real Net's block: two binary 3x3 convs, each with its own real-valued shortcut::

    identity = downsample(x) or x
    h = BN1(binconv1(x)) + identity                # binconv = sign -> conv (-> scale)
    out = BN2(binconv2(h)) + h
    """

    expansion = 1
    stem_relu = False
    centre_weights = False

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        in_size: tuple[int, int],
        variant: Binarization,
        scale: str,
        estimator: str,
        centre: bool = False,
    ) -> None:
        super().__init__()
        w, a = variant.weights, variant.inputs
        self.out_size = conv_output_size(in_size, 3, stride, 1)
        self.act1: nn.Module = nn.Identity() if a else nn.Hardtanh()
        self.conv1 = binary_conv(cin, cout, 3, stride, in_size, w, a, scale, estimator, centre)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act2: nn.Module = nn.Identity() if a else nn.Hardtanh()
        self.conv2 = binary_conv(cout, cout, 3, 1, self.out_size, w, a, scale, estimator, centre)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = downsample_shortcut(cin, cout, stride, self.out_size, variant, scale, estimator,
                                                  centre)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = self.bn1(self.conv1(self.act1(x))) + identity
        return self.bn2(self.conv2(self.act2(h))) + h


class LearnableShift(nn.Module):
    """``x + b`` with one learned ``b`` per channel, zero at init (ReActNet's RSign threshold and the
    shifts of RPReLU)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift


class RPReLU(nn.Module):
    """ReActNet's RPReLU: ``PReLU(x + b_in) + b_out`` per channel (slopes 0.25, shifts 0 at init)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift_in = LearnableShift(channels)
        self.prelu = nn.PReLU(channels)
        self.shift_out = LearnableShift(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.shift_out(self.prelu(self.shift_in(x)))


@BLOCKS.register("reactnet")
class ReActBlock(nn.Module):
    """ReActNet's block on the Bi-Real layout::

    identity = downsample(x) or x
    h = RPReLU1(BN1(binconv1(x + t1)) + identity)     # x + t1 then sign: RSign's learned threshold
    out = RPReLU2(BN2(binconv2(h + t2)) + h)
    """

    expansion = 1
    stem_relu = False
    centre_weights = False

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        in_size: tuple[int, int],
        variant: Binarization,
        scale: str,
        estimator: str,
        centre: bool = False,
    ) -> None:
        super().__init__()
        w, a = variant.weights, variant.inputs
        self.out_size = conv_output_size(in_size, 3, stride, 1)
        self.move1 = LearnableShift(cin)
        self.conv1 = binary_conv(cin, cout, 3, stride, in_size, w, a, scale, estimator, centre)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = RPReLU(cout)
        self.move2 = LearnableShift(cout)
        self.conv2 = binary_conv(cout, cout, 3, 1, self.out_size, w, a, scale, estimator, centre)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = RPReLU(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = downsample_shortcut(cin, cout, stride, self.out_size, variant, scale, estimator,
                                                  centre)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = self.act1(self.bn1(self.conv1(self.move1(x))) + identity)
        return self.act2(self.bn2(self.conv2(self.move2(h))) + h)
