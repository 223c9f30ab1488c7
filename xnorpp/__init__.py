"""xnorpp: binary neural networks (XNOR-Net++) with composable experiments.

Importing the package registers ``resnet18_preact_bin`` and ``resnet34_preact_bin`` with timm.
"""

from . import models, nn
from .model_summary import summary
from .models import BINARIZATIONS
from .nn import SCALES, BinaryConv2d, sign_ste

__version__ = "0.1.0"
__all__ = ["BINARIZATIONS", "SCALES", "BinaryConv2d", "models", "nn", "sign_ste", "summary"]
