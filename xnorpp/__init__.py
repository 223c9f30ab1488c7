"""xnorpp: binary neural networks (XNOR-Net++ and the methods around it) with composable experiments.

Importing the package registers ``resnet18_preact_bin`` and ``resnet34_preact_bin`` with timm, the
config resolvers of :mod:`xnorpp.resolvers` with OmegaConf, and switches on the speed defaults that are
safe in any process (:data:`xnorpp.accel.LIBRARY_DEFAULTS`).
"""

from . import accel, models, nn, resolvers
from .model_summary import summary
from .models import BINARIZATIONS
from .nn import SCALES, BinarizePolicy, BinaryConv2d, binarize, sign_ste

resolvers.register()
accel.library_defaults()
__version__ = "0.1.0"
__all__ = [
    "BINARIZATIONS", "SCALES", "BinarizePolicy", "BinaryConv2d", "accel", "binarize", "models", "nn", "sign_ste",
    "summary",
]  # fmt: skip
