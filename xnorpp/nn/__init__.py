"""Binary building blocks: sign functions with straight-through estimators, scale factors, BinaryConv2d.

The speed code behind them (:mod:`.fused`, :mod:`.kernels`, :mod:`.native`, :mod:`.int8_conv`) is switched
through :mod:`xnorpp.accel` only."""

from .conv import BinaryConv2d
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
    "identity_sign",
    "max_pool2d",
    "sign_ste",
    "weight_sign",
]
