"""Distillation from a real-valued teacher (the ``distill`` config group).

- ``none``: cross-entropy on the labels.
- ``kd``: knowledge distillation (Hinton et al. 2015, arXiv 1503.02531),
  ``(1 - weight) CE(s, y) + weight T^2 KL(softmax(t / T) || softmax(s / T))``.
- ``distribution``: ReActNet's distributional loss (Liu et al., ECCV 2020), the teacher's distribution
  only, no labels: ``KL(softmax(t) || softmax(s))`` (its gradient is the soft-target cross-entropy's).

The teacher (:func:`load_teacher`) is a checkpoint of this framework (a ``.pt`` training checkpoint or
an export ``.safetensors``) or a timm model name with local pretrained weights. It runs in eval mode
without gradients, inside the training step: its forward is part of the step's time (img/s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry

__all__ = ["DISTILLERS", "Distiller", "distribution_loss", "kd_loss", "load_teacher"]

DISTILLERS: Registry[Any] = Registry("distillation", "distill", "xnorpp.engine.distill.DISTILLERS")


def kd_loss(
    student: Tensor, teacher: Tensor, target: Tensor, temperature: float = 4.0, weight: float = 0.9,
    hard_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """``(1 - weight) CE(student, target) + weight T^2 KL(softmax(teacher / T) || softmax(student / T))``;
    the ``T^2`` keeps the soft term's gradient on the scale of the hard one (Hinton et al. 2015).
    ``hard_loss(student, target)`` replaces the cross-entropy of the hard term (the run's ``loss``)."""
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True
    )
    hard = (hard_loss or F.cross_entropy)(student, target) if weight < 1 else student.new_zeros(())
    return (1.0 - weight) * hard + weight * t * t * soft


def distribution_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """ReActNet's distributional loss ``KL(softmax(teacher) || softmax(student))``, batch mean."""
    return F.kl_div(
        F.log_softmax(student, 1), F.log_softmax(teacher, 1), reduction="batchmean", log_target=True
    )


DISTILLERS.register("none")(None)
DISTILLERS.register("kd")(kd_loss)
DISTILLERS.register("distribution")(distribution_loss)


class Distiller:
    """The training loss with a teacher: ``distiller(logits, target, images)``; the teacher sees
    ``images`` in eval mode under ``torch.no_grad``, in the autocast context of the step."""

    takes_inputs = True  # the training step passes the batch (xnorpp.engine.loop)

    def __init__(
        self, name: str, teacher: nn.Module, temperature: float = 4.0, weight: float = 0.9,
        hard_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:  # fmt: skip
        if DISTILLERS.get(name) is None:
            raise ValueError("distill=none has no teacher: build no Distiller")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distill.weight must be in [0, 1], got {weight}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"distill.temperature must be positive, got {temperature}")
        self.name, self.teacher = name, teacher.eval().requires_grad_(False)
        self.temperature, self.weight, self.hard_loss = float(temperature), float(weight), hard_loss

    def __call__(self, logits: Tensor, target: Tensor, images: Tensor) -> Tensor:
        with torch.no_grad():
            teacher = self.teacher(images).float()
        if self.name == "kd":
            return kd_loss(logits, teacher, target, self.temperature, self.weight, self.hard_loss)
        return distribution_loss(logits, teacher)


def load_teacher(spec: str, num_classes: int, in_chans: int, weights_file: str | None = None) -> nn.Module:
    """A teacher from ``spec``: a training checkpoint (``.pt``/``.pth``) or an export (``.safetensors``) of
    this framework, else a timm model name whose pretrained weights are local: timm's cache (with
    ``HF_HUB_OFFLINE=1`` a missing file fails at once instead of after the hub's retries), or
    ``weights_file``, a state dict of that model for the data's classes. Its classes must be the data's."""
    from ..export import build_model_from_args, load_checkpoint, load_export

    path = Path(str(spec)).expanduser()
    if path.suffix in (".pt", ".pth", ".safetensors") or path.is_file():
        if path.suffix == ".safetensors":
            model = load_export(path)
        else:
            state, model_args = load_checkpoint(path)
            model = build_model_from_args(model_args)
            model.load_state_dict(state, strict=True)
    else:
        # a weights file holds this data's classifier; timm's own weights keep the model's classes
        local = {"num_classes": num_classes, "pretrained_cfg_overlay": {"file": str(Path(weights_file).expanduser()),
                 "num_classes": num_classes}} if weights_file else {}  # fmt: skip
        try:
            model = timm.create_model(str(spec), pretrained=True, in_chans=in_chans, **local)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(
                    f"distill.teacher={spec!r} is neither a checkpoint file nor a timm model name"
                ) from None
            raise
        except Exception as e:
            raise ValueError(
                f"timm model {spec!r} has no local pretrained weights ({type(e).__name__}: {e}); give "
                "distill.teacher_file=PATH, fetch the weights once online, or use a checkpoint of this "
                "framework (e.g. an fp run's checkpoints/best.pt)"
            ) from None
    classes = getattr(model, "num_classes", None)
    if classes is not None and int(classes) != int(num_classes):
        raise ValueError(
            f"teacher {spec!r} predicts {classes} classes but the data has {num_classes}: use a teacher "
            "trained on this data (e.g. an fp run of this framework: distill.teacher=RUN/checkpoints/best.pt)"
        )
    return model.eval().requires_grad_(False)
