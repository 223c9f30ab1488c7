"""Pre-activation binary ResNets of the original XNOR-Net++ reproduction, registered with timm.

Basic block (docs/method.md)::

    identity = x
    h = BN1(x)
    if downsample: identity = downsample(h)        # the shortcut sees the normalised input
    h = ReLU(binconv1(h)); h = BN2(h); h = binconv2(h); h = BN3(h)
    out = ReLU(h + identity)

Downsample shortcut: avg-pool 2x2 stride 2 -> 1x1 conv -> BN. Stem (7x7/2 conv, BN, ReLU, 3x3/2
max-pool, or a 3x3/1 conv without pooling for small images) and classifier stay real-valued.

``block`` swaps the block for another method's (:data:`~xnorpp.models.blocks.BLOCKS`: ``preact``,
``bireal``, ``reactnet``) on the same skeleton.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import Tensor, nn

from ..nn import SPATIAL_SCALES, BinaryConv2d, MaxPool2d, conv_output_size
from ..nn.scale import check_scale
from .blocks import BLOCKS, PreActBasicBlock
from .variants import BINARIZATIONS, Binarization, get_binarization

__all__ = [
    "BINARIZATIONS",
    "BLOCKS",
    "STEMS",
    "Binarization",
    "PreActBasicBlock",
    "PreActBinaryResNet",
    "get_binarization",
]


STEMS: tuple[str, ...] = ("imagenet", "small")


def _size2(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (H, W), got {size!r}")
    return (int(size[0]), int(size[1]))


class PreActBinaryResNet(nn.Module):
    """Pre-activation ResNet with binary block convolutions (variants in :data:`BINARIZATIONS`).

    Args:
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        binarization: ``fp``, ``weight_only``, ``full_binary`` or ``real_downsample``.
        scale: scale factor of the binary convolutions (``xnorpp.nn.SCALES``); ignored by ``fp``.
        num_classes, in_chans: classifier outputs and image channels.
        input_size: the image size the model is built for (int or (H, W)); spatial scales are sized
            from it and a forward with another size is an error.
        stem: ``imagenet`` (7x7/2 conv + 3x3/2 max-pool) or ``small`` (3x3/1 conv, no pooling).
        estimator: activation gradient (``xnorpp.nn.ACTIVATION_ESTIMATORS``).
        widths: channels per stage.
        block: the residual block (``xnorpp.models.BLOCKS``: ``preact``, ``bireal``, ``reactnet``).
        centre_weights: binarize ``W - mean_dim1 W`` (``None``: the block's default; the Bop optimizer
            needs ``False``, its latent weights being the binary weights themselves).
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        binarization: str = "real_downsample",
        scale: str = "rank1",
        num_classes: int = 1000,
        in_chans: int = 3,
        input_size: int | tuple[int, int] = 224,
        stem: str = "imagenet",
        estimator: str = "ste",
        widths: tuple[int, ...] = (64, 128, 256, 512),
        block: str = "preact",
        centre_weights: bool | None = None,
    ) -> None:
        super().__init__()
        variant = get_binarization(binarization)
        block_cls = BLOCKS.get(block)
        centre = block_cls.centre_weights if centre_weights is None else bool(centre_weights)
        check_scale(scale)
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid choices: {', '.join(STEMS)}")
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"four stages expected, got layers={tuple(layers)} widths={tuple(widths)}")
        self.binarization = variant.name
        self.block = block
        self.scale = scale if variant.any else "none"
        self.stem_type = stem
        self.input_size = _size2(input_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = widths[-1]

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = MaxPool2d(3, stride=2, padding=1)
            size = conv_output_size(conv_output_size(self.input_size, 7, 2, 3), 3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
            size = self.input_size
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu: nn.Module = nn.ReLU(inplace=True) if block_cls.stem_relu else nn.Identity()

        stages = []
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                unit = block_cls(cin, cout, stride, size, variant, self.scale, estimator, centre)
                size = unit.out_size
                cin = cout
                blocks.append(unit)
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.final_size = size
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """As the original project: real-valued convs (stem, real downsample 1x1, every conv of ``fp``)
        Kaiming normal in PyTorch's default ``fan_in`` mode, ``std = sqrt(2 / (C_in k^2))`` (stem:
        0.116 for 3 channels); binary latent weights keep ``BinaryConv2d``'s uniform [0, 1e-3), which
        only centring turns into mixed signs: uncentred ones start Kaiming normal too;
        BatchNorm weight 1, bias 0."""
        for m in self.modules():
            binary = getattr(m, "binarize_weights", False) and getattr(m, "centre_weights", True)
            if isinstance(m, nn.Conv2d) and not binary:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def binary_convs(self) -> list[tuple[str, BinaryConv2d]]:
        """``(name, module)`` of every convolution that binarizes weights or inputs."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, BinaryConv2d) and m.is_binary]

    def _check_input(self, x: Tensor) -> None:
        if self.scale in SPATIAL_SCALES and tuple(x.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise ValueError(
                f"this model was built for {h}x{w} inputs (scale {self.scale!r} has a spatial shape) "
                f"but got {x.shape[-2]}x{x.shape[-1]}: build it with input_size={x.shape[-1]} "
                f"(data.image_size in configs) or feed {h}x{w} images"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        self._check_input(x)
        # relu(maxpool(.)) == maxpool(relu(.)) in values and gradients (both monotone, the first maximum
        # kept; only a zero's sign may differ): the ReLU then runs on the pooled, 4x smaller tensor
        x = self.relu(self.maxpool(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


def _create(layers: tuple[int, ...], pretrained: bool, kwargs: dict[str, Any]) -> PreActBinaryResNet:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if pretrained:
        raise ValueError("no pretrained weights are published for the binary pre-activation ResNets")
    return PreActBinaryResNet(layers=layers, **kwargs)


@register_model
def resnet18_preact_bin(pretrained: bool = False, **kwargs: Any) -> PreActBinaryResNet:
    """The original project's binary pre-activation ResNet-18 (``resnet18_preact_bin``)."""
    return _create((2, 2, 2, 2), pretrained, kwargs)


@register_model
def resnet34_preact_bin(pretrained: bool = False, **kwargs: Any) -> PreActBinaryResNet:
    """Binary pre-activation ResNet-34 with the same block."""
    return _create((3, 4, 6, 3), pretrained, kwargs)
