"""Model zoo: binary pre-activation ResNets, registered with timm on import."""

from .resnet_preact import (
    BINARIZATIONS,
    STEMS,
    Binarization,
    PreActBasicBlock,
    PreActBinaryResNet,
    get_binarization,
    resnet18_preact_bin,
    resnet34_preact_bin,
)

__all__ = [
    "BINARIZATIONS",
    "STEMS",
    "Binarization",
    "PreActBasicBlock",
    "PreActBinaryResNet",
    "get_binarization",
    "resnet18_preact_bin",
    "resnet34_preact_bin",
]
