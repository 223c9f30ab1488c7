"""Optimizers over the original project's weight-decay groups, and per-iteration LR schedules, by name.

Parameter groups (:func:`param_groups`): the latent weights of binary convolutions and every scale
factor get ``binary_weight_decay`` (0 in the original); everything else (stem, real downsample convs,
BatchNorm affine, classifier) gets ``weight_decay``.

``optimizer.name`` is looked up in :data:`OPTIMIZERS` (built in: ``sgd``, ``adam``, ``adamw``, ``bop``), then among
timm's optimizers (``lamb``, ``lion``, ``adabelief``, ... :func:`timm.optim.list_optimizers`), created by
:func:`timm.optim.create_optimizer_v2` over the same groups. ``scheduler.name`` likewise in
:data:`SCHEDULERS`, then timm's :func:`~timm.scheduler.create_scheduler_v2` (``poly``, ``tanh``, ...),
stepped every iteration. Add your own from any module::

    from xnorpp.engine import OPTIMIZERS

    @OPTIMIZERS.register("my_sgd")
    def my_sgd(groups, *, lr, momentum=0.9, **unused):  # groups: the two weight-decay groups
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)

A factory that takes a ``model`` argument gets the model too (``bop``: its binary weights are found by
layer, not by group).

An option the chosen optimizer or schedule does not take (``nesterov`` after ``optimizer.name=lamb`` on
the ``sgd`` preset) is left out with a warning that names it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class, list_optimizers
from timm.scheduler import (
    CosineLRScheduler,
    MultiStepLRScheduler,
    PolyLRScheduler,
    StepLRScheduler,
    create_scheduler_v2,
)
from timm.scheduler.scheduler import Scheduler
from torch import nn

from ..nn import BinaryConv2d, ScaleFactor
from ..registry import Registry
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

log = logging.getLogger("xnorpp")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Scheduler]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", "optimizer.name", "xnorpp.engine.OPTIMIZERS")
SCHEDULERS: Registry[SchedulerFactory] = Registry("scheduler", "scheduler.name", "xnorpp.engine.SCHEDULERS")
LR_SCALES: tuple[str, ...] = ("linear", "sqrt", "none")
_TIMM_SCHEDULER_KEYS = {"milestones": "decay_milestones", "t_mult": "cycle_mul"}  # ours -> timm's


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


def _accepted(
    fn: Callable[..., Any], options: dict[str, Any], what: str, skip: Iterable[str] = ()
) -> dict[str, Any]:
    """``options`` that ``fn`` takes (all if it takes ``**kwargs``); the others are left out with a warning."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    dropped = sorted(k for k in options if k not in params and k not in skip)
    if dropped:
        log.warning("%s takes no %s: left out", what, ", ".join(dropped))
    return {k: v for k, v in options.items() if k in params or k in skip}


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float = 0.0, binary_weight_decay: float = 0.0,
    **options: Any,
) -> torch.optim.Optimizer:  # fmt: skip
    """Optimizer ``name`` over :func:`param_groups` (see the module doc for where names are looked up);
    ``options`` are its own arguments (``momentum``, ``nesterov``, ``betas``, ``eps``, ...)."""
    groups = param_groups(model, weight_decay, binary_weight_decay)
    if name in OPTIMIZERS:
        factory = OPTIMIZERS[name]
        given = {**options, "model": model} if "model" in inspect.signature(factory).parameters else options
        return factory(groups, lr=lr, **_accepted(factory, given, f"optimizer {name}"))
    if str(name).lower() not in list_optimizers():
        raise ValueError(
            f"unknown optimizer {name!r} (optimizer.name): neither one of {', '.join(OPTIMIZERS)} nor timm's "
            "(timm.optim.list_optimizers()). Add one with @xnorpp.engine.OPTIMIZERS.register(NAME) in your own module"
        )
    cls = get_optimizer_class(str(name).lower(), bind_defaults=False)
    # timm sets momentum where the optimizer has it and drops betas/eps where it has none
    kept = _accepted(cls.__init__, options, f"optimizer {name}", skip=("momentum", "betas", "eps"))
    return create_optimizer_v2(groups, opt=str(name).lower(), lr=lr, **kept)


@OPTIMIZERS.register("sgd")
def _sgd(
    groups: list[dict[str, Any]], *, lr: float, momentum: float = 0.9, nesterov: bool = False
) -> torch.optim.Optimizer:
    """SGD with momentum (no Nesterov unless asked: timm's ``sgd`` is Nesterov's)."""
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


@OPTIMIZERS.register("adam")
def _adam(
    groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps)


@OPTIMIZERS.register("adamw")
def _adamw(
    groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


@OPTIMIZERS.register("bop")
def _bop(
    groups: list[dict[str, Any]], *, model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8, gamma: float = 1e-4, threshold: float = 1e-8,
) -> torch.optim.Optimizer:  # fmt: skip
    """Bop (``gamma``, ``threshold``) for the binary weights, Adam (``lr``) for the rest, with the weight
    decays of ``groups`` (:mod:`xnorpp.engine.bop`)."""
    decay = {g["name"]: g["weight_decay"] for g in groups}
    return build_bop(model, lr, decay["real"], decay.get("binary", 0.0), tuple(betas), eps, gamma, threshold)


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, epochs: int, updates_per_epoch: int, **options: Any
) -> Scheduler:
    """A scheduler stepped every iteration (``step_update(global_step)``, so the LR is a function of the
    step alone: exact on resume), times given in (fractional) epochs; see :data:`SCHEDULERS`. A name of
    timm's goes to :func:`~timm.scheduler.create_scheduler_v2` in per-update mode."""
    upe = max(1, int(updates_per_epoch))
    if name in SCHEDULERS:
        factory = SCHEDULERS[name]
        return factory(
            optimizer,
            epochs=epochs,
            updates_per_epoch=upe,
            **_accepted(factory, options, f"scheduler {name}"),
        )
    renamed = {_TIMM_SCHEDULER_KEYS.get(k, k): v for k, v in options.items()}
    kept = _accepted(create_scheduler_v2, {"warmup_prefix": True, **renamed}, f"scheduler {name}")
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=str(name), num_epochs=epochs, step_on_epochs=False, updates_per_epoch=upe, **kept
        )
    except (AssertionError, ValueError, KeyError) as e:
        raise ValueError(
            f"unknown scheduler {name!r} (scheduler.name): neither one of {', '.join(SCHEDULERS)} nor one of timm's "
            f"(create_scheduler_v2: {e}). Add one with @xnorpp.engine.SCHEDULERS.register(NAME)"
        ) from None
    if scheduler is None:
        raise ValueError(
            f"unknown scheduler {name!r} (scheduler.name); valid choices: {', '.join(SCHEDULERS)} or timm's"
        )
    return scheduler


def _common(upe: int, warmup_epochs: float, warmup_lr: float) -> dict[str, Any]:
    """The warmup (linear from ``warmup_lr``, prepended) and per-update stepping every schedule shares."""
    return dict(
        warmup_t=round(warmup_epochs * upe), warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False
    )


@SCHEDULERS.register("cosine_restarts")
def _cosine_restarts(
    optimizer: torch.optim.Optimizer, *, epochs: int, updates_per_epoch: int, min_lr: float = 0.0,
    t0_epochs: float = 1.0, t_mult: float = 2.0, warmup_epochs: float = 0.0, warmup_lr: float = 0.0,
) -> Scheduler:  # fmt: skip
    """SGDR (torch's ``CosineAnnealingWarmRestarts``) with ``T_0 = t0_epochs`` and ``T_mult = t_mult``,
    evaluated at the fractional epoch; cycles end at 1, 3, 7, 15, 31, 63 epochs."""
    upe = updates_per_epoch
    return CosineLRScheduler(
        optimizer, t_initial=max(1, round(t0_epochs * upe)), lr_min=min_lr, cycle_mul=t_mult, cycle_limit=10_000,
        **_common(upe, warmup_epochs, warmup_lr),
    )  # fmt: skip


@SCHEDULERS.register("cosine")
def _cosine(
    optimizer: torch.optim.Optimizer, *, epochs: int, updates_per_epoch: int, min_lr: float = 0.0,
    warmup_epochs: float = 0.0, warmup_lr: float = 0.0,
) -> Scheduler:  # fmt: skip
    """One cosine from the base LR to ``min_lr`` over all epochs."""
    common = _common(updates_per_epoch, warmup_epochs, warmup_lr)
    t_initial = max(1, epochs * updates_per_epoch - common["warmup_t"])
    return CosineLRScheduler(optimizer, t_initial=t_initial, lr_min=min_lr, **common)


@SCHEDULERS.register("step")
def _step(
    optimizer: torch.optim.Optimizer, *, epochs: int, updates_per_epoch: int, decay_epochs: float = 30.0,
    decay_rate: float = 0.1, warmup_epochs: float = 0.0, warmup_lr: float = 0.0,
) -> Scheduler:  # fmt: skip
    """LR times ``decay_rate`` every ``decay_epochs``."""
    return StepLRScheduler(optimizer, decay_t=decay_epochs * updates_per_epoch, decay_rate=decay_rate,
                           **_common(updates_per_epoch, warmup_epochs, warmup_lr))  # fmt: skip


@SCHEDULERS.register("multistep")
def _multistep(
    optimizer: torch.optim.Optimizer, *, epochs: int, updates_per_epoch: int,
    milestones: tuple[float, ...] = (30.0, 60.0, 90.0), decay_rate: float = 0.1, warmup_epochs: float = 0.0,
    warmup_lr: float = 0.0,
) -> Scheduler:  # fmt: skip
    """LR times ``decay_rate`` at each of ``milestones`` (epochs)."""
    steps = [round(m * updates_per_epoch) for m in milestones]
    return MultiStepLRScheduler(optimizer, decay_t=steps, decay_rate=decay_rate,
                                **_common(updates_per_epoch, warmup_epochs, warmup_lr))  # fmt: skip


@SCHEDULERS.register("constant")
def _constant(
    optimizer: torch.optim.Optimizer, *, epochs: int, updates_per_epoch: int, warmup_epochs: float = 0.0,
    warmup_lr: float = 0.0,
) -> Scheduler:  # fmt: skip
    """The base LR throughout (after any warmup)."""
    return StepLRScheduler(
        optimizer, decay_t=10**12, decay_rate=1.0, **_common(updates_per_epoch, warmup_epochs, warmup_lr)
    )


@SCHEDULERS.register("linear")
def _linear(
    optimizer: torch.optim.Optimizer, *, epochs: int, updates_per_epoch: int, min_lr: float = 0.0,
    warmup_epochs: float = 0.0, warmup_lr: float = 0.0,
) -> Scheduler:  # fmt: skip
    """A straight line from the base LR to ``min_lr`` over all epochs (ReActNet's schedule)."""
    common = _common(updates_per_epoch, warmup_epochs, warmup_lr)
    t_initial = max(1, epochs * updates_per_epoch - common["warmup_t"])
    return PolyLRScheduler(optimizer, t_initial=t_initial, power=1.0, lr_min=min_lr, **common)
