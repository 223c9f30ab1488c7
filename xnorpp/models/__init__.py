"""Model zoo: binary ResNets (registered with timm on import) with a choice of block, and any timm CNN
binarized by :func:`xnorpp.nn.binarize` (:func:`create_binarized`)."""

from .binarized import binarize_policy, create_binarized
from .blocks import BLOCKS, BiRealBlock, LearnableShift, ReActBlock, RPReLU
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
    "BLOCKS",
    "STEMS",
    "BiRealBlock",
    "Binarization",
    "LearnableShift",
    "PreActBasicBlock",
    "PreActBinaryResNet",
    "RPReLU",
    "ReActBlock",
    "binarize_policy",
    "create_binarized",
    "get_binarization",
    "resnet18_preact_bin",
    "resnet34_preact_bin",
]
