"""Binary building blocks: sign functions with straight-through estimators, scale factors, BinaryConv2d."""

from .conv import BinaryConv2d
from .int8_conv import int8_conv_active, int8_conv_enabled, set_int8_conv
from .kernels import KERNEL_MODES, get_kernels, set_kernels
from .pool import MaxPool2d, max_pool2d
from .scale import (
    LEARNED_SCALES,
    SCALES,
    SPATIAL_SCALES,
    LearnedScale,
    NoScale,
    ScaleFactor,
    XnorScale,
    build_scale,
    conv_output_size,
)
from .sign import (
    ACTIVATION_ESTIMATORS,
    approx_sign,
    binary_sign,
    centre_weight,
    get_estimator,
    identity_sign,
    sign_ste,
    weight_sign,
)

__all__ = [
    "ACTIVATION_ESTIMATORS",
    "KERNEL_MODES",
    "LEARNED_SCALES",
    "SCALES",
    "SPATIAL_SCALES",
    "BinaryConv2d",
    "LearnedScale",
    "MaxPool2d",
    "NoScale",
    "ScaleFactor",
    "XnorScale",
    "approx_sign",
    "binary_sign",
    "build_scale",
    "centre_weight",
    "conv_output_size",
    "get_estimator",
    "get_kernels",
    "identity_sign",
    "int8_conv_active",
    "int8_conv_enabled",
    "max_pool2d",
    "set_int8_conv",
    "set_kernels",
    "sign_ste",
    "weight_sign",
]
