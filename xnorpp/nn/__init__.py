"""Binary building blocks: sign functions with straight-through estimators, scale factors, BinaryConv2d.

The speed code behind them (:mod:`.fused`, :mod:`.kernels`, :mod:`.native`, :mod:`.int8_conv`) is switched
through :mod:`xnorpp.accel` only."""

from .binarize import BinarizationMap, BinarizePolicy, LayerPlan, binarize
from .conv import BinaryConv2d
from .linear import BinaryLinear
from .pool import MaxPool2d, max_pool2d
from .scale import (
    ANALYTIC_SCALES,
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
    QUANTIZERS,
    ApproxSign,
    MagnitudeAwareSign,
    Quantizer,
    SteSign,
    SwishSign,
    approx_sign,
    binary_sign,
    centre_weight,
    get_estimator,
    identity_sign,
    magnitude_aware_sign,
    sign_ste,
    swish_sign,
    weight_sign,
)

__all__ = [
    "ACTIVATION_ESTIMATORS",
    "ANALYTIC_SCALES",
    "LEARNED_SCALES",
    "QUANTIZERS",
    "SCALES",
    "SPATIAL_SCALES",
    "ApproxSign",
    "BinarizationMap",
    "BinarizePolicy",
    "BinaryConv2d",
    "BinaryLinear",
    "LayerPlan",
    "LearnedScale",
    "MagnitudeAwareSign",
    "MaxPool2d",
    "NoScale",
    "Quantizer",
    "ScaleFactor",
    "SteSign",
    "SwishSign",
    "XnorScale",
    "approx_sign",
    "binarize",
    "binary_sign",
    "build_scale",
    "centre_weight",
    "conv_output_size",
    "get_estimator",
    "identity_sign",
    "magnitude_aware_sign",
    "max_pool2d",
    "sign_ste",
    "swish_sign",
    "weight_sign",
]
