"""Optimizers with the original project's weight-decay groups, and per-iteration LR schedules (timm).

Parameter groups (REFERENCE section 4): the latent weights of binary convolutions and every scale
factor get ``binary_weight_decay`` (0 in the original); everything else (stem, real downsample convs,
BatchNorm affine, classifier) gets ``weight_decay``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from ..nn import BinaryConv2d, ScaleFactor
from .bop import build_bop

__all__ = [
    "LR_SCALES",
    "OPTIMIZERS",
    "SCHEDULERS",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "param_groups",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "bop")
SCHEDULERS: tuple[str, ...] = ("cosine_restarts", "cosine", "step", "multistep", "constant", "linear")
LR_SCALES: tuple[str, ...] = ("linear", "sqrt", "none")


def lr_factor(batch_size: int, base_size: int | None, rule: str = "linear") -> float:
    """What a learning rate given for a global batch of ``base_size`` is multiplied by for ``batch_size``.

    ``linear``: ``batch_size / base_size`` (Goyal et al. 2017, "Accurate, large minibatch SGD"), for SGD;
    ``sqrt``: its square root, for adaptive optimizers (Adam's step does not grow with the gradient's
    size); ``none`` or ``base_size=None``: 1.
    """
    if rule not in LR_SCALES:
        raise ValueError(f"unknown optimizer.lr_base_scale {rule!r}; valid choices: {', '.join(LR_SCALES)}")
    if base_size is None or rule == "none":
        return 1.0
    if int(base_size) < 1 or int(batch_size) < 1:
        raise ValueError(
            f"batch sizes must be positive, got batch {batch_size} and optimizer.lr_base_size {base_size}"
        )
    ratio = int(batch_size) / int(base_size)
    return ratio if rule == "linear" else ratio**0.5


def param_groups(
    model: nn.Module, weight_decay: float, binary_weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Split parameters into the "binary" group (latent binary weights, scale factors) and the rest."""
    binary_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BinaryConv2d) and module.binarize_weights:
            binary_ids.add(id(module.weight))
        if isinstance(module, ScaleFactor):
            binary_ids.update(id(p) for p in module.parameters())
    binary, real = [], []
    for p in model.parameters():
        if p.requires_grad:
            (binary if id(p) in binary_ids else real).append(p)
    groups = [{"params": real, "weight_decay": weight_decay, "name": "real"}]
    if binary:
        groups.append({"params": binary, "weight_decay": binary_weight_decay, "name": "binary"})
    return groups


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    binary_weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    gamma: float = 1e-4,
    threshold: float = 1e-8,
) -> torch.optim.Optimizer:
    """``sgd`` (momentum, optional Nesterov), ``adam`` or ``adamw`` over :func:`param_groups`; ``bop``:
    Bop (``gamma``, ``threshold``) for the binary weights, Adam for the rest (:mod:`xnorpp.engine.bop`)."""
    if name == "bop":
        return build_bop(model, lr, weight_decay, binary_weight_decay, tuple(betas), eps, gamma, threshold)
    groups = param_groups(model, weight_decay, binary_weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    epochs: int,
    updates_per_epoch: int,
    min_lr: float = 0.0,
    t0_epochs: float = 1.0,
    t_mult: float = 2.0,
    decay_epochs: float = 30.0,
    milestones: tuple[float, ...] = (30.0, 60.0, 90.0),
    decay_rate: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_lr: float = 0.0,
) -> Scheduler:
    """A timm scheduler stepped every iteration (``step_update(global_step)``), times given in epochs.

    - ``cosine_restarts``: SGDR (torch's ``CosineAnnealingWarmRestarts``) with ``T_0 = t0_epochs`` and
      ``T_mult = t_mult``, evaluated at the fractional epoch; cycles end at 1, 3, 7, 15, 31, 63 epochs.
    - ``cosine``: one cosine from the base LR to ``min_lr`` over all epochs.
    - ``step``: LR times ``decay_rate`` every ``decay_epochs``; ``multistep``: at each of ``milestones``.
    - ``constant``: the base LR throughout (after any warmup).
    - ``linear``: a straight line from the base LR to ``min_lr`` over all epochs (ReActNet's schedule).
    Warmup (linear from ``warmup_lr``) is prepended to any of them.
    """
    upe = max(1, int(updates_per_epoch))
    warm = round(warmup_epochs * upe)
    common: dict[str, Any] = dict(
        warmup_t=warm, warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False
    )
    if name == "cosine_restarts":
        return CosineLRScheduler(
            optimizer, t_initial=max(1, round(t0_epochs * upe)), lr_min=min_lr, cycle_mul=t_mult,
            cycle_limit=10_000, **common,
        )  # fmt: skip
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, epochs * upe - warm), lr_min=min_lr, **common)
    if name == "step":
        return StepLRScheduler(optimizer, decay_t=decay_epochs * upe, decay_rate=decay_rate, **common)
    if name == "multistep":
        steps = [round(m * upe) for m in milestones]
        return MultiStepLRScheduler(optimizer, decay_t=steps, decay_rate=decay_rate, **common)
    if name == "constant":
        return StepLRScheduler(optimizer, decay_t=10**12, decay_rate=1.0, **common)
    if name == "linear":
        return PolyLRScheduler(
            optimizer, t_initial=max(1, epochs * upe - warm), power=1.0, lr_min=min_lr, **common
        )
    raise ValueError(f"unknown scheduler {name!r}; valid choices: {', '.join(SCHEDULERS)}")
