"""Any timm model binarized by a variant (``model=timm model.name=<name> binarization=<variant>``).

The binarization variants keep their meaning on any architecture: ``weights`` and ``inputs`` say what
the selected layers binarize, ``downsample`` whether the layers ``downsample_pattern`` names (the 1x1
shortcut convs of ResNets; other models may have none) are binary too. ``fp`` binarizes nothing:
the timm model as it is, the real baseline of the same architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
from torch import nn

from ..nn.binarize import BinarizePolicy, binarize
from .resnet_preact import get_binarization

__all__ = ["binarize_policy", "create_binarized"]


def binarize_policy(
    binarization: str, scale: str = "channel", estimator: str = "ste", **options: Any
) -> BinarizePolicy:
    """The :class:`~xnorpp.nn.BinarizePolicy` of a variant (``fp``, ``weight_only``, ``full_binary``,
    ``real_downsample``, ``activation_only``) with the layer ``options`` of ``model.binarize``."""
    v = get_binarization(binarization)
    return BinarizePolicy.from_dict(
        {**options, "weights": v.weights, "inputs": v.inputs, "downsample": v.downsample, "scale": scale,
         "estimator": estimator}
    )  # fmt: skip


def create_binarized(model_args: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model(name, num_classes, in_chans, **kwargs)`` binarized as ``model_args`` say:
    ``binarization``, ``scale``, ``estimator``, ``input_size``, the policy options ``binarize`` and, if
    present, ``centre_weights`` (``kwargs``: the model's own arguments, ``model.kwargs``)."""
    args = dict(model_args)
    options = dict(args.get("binarize") or {})
    if "centre_weights" in args:
        options["centre_weights"] = bool(args["centre_weights"])
    policy = binarize_policy(str(args["binarization"]), str(args["scale"]), str(args.get("estimator", "ste")),
                             **options)  # fmt: skip
    extra = dict(args.get("kwargs") or {})
    model = timm.create_model(
        str(args["name"]), num_classes=int(args["num_classes"]), in_chans=int(args["in_chans"]), **extra
    )
    return binarize(model, policy, input_size=args["input_size"], in_chans=int(args["in_chans"]))
