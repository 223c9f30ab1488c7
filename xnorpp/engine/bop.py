"""Bop, the optimizer for binary weights without latent weights (Helwegen et al., NeurIPS 2019,
"Latent Weights Do Not Exist", arXiv 1906.02107), with Adam for every real-valued parameter.

For a binary weight ``w`` in ``{-1, +1}`` with gradient ``g``, per element::

    m <- (1 - gamma) m + gamma g                 # exponential moving average of the gradient
    w <- -w   if w * m > threshold               # m agrees with w in sign and passes the threshold
    w <-  w   otherwise

(a gradient of the same sign as ``w`` says that ``-w`` would lower the loss). ``gamma`` (the
adaptivity rate) and ``threshold`` are larq's defaults, ``1e-4`` and ``1e-8``. The weights Bop holds
are the binary weights themselves, so the binary convolutions must binarize ``sign(W)`` without centring
(``centre_weights=False``, which ``optimizer=bop`` sets in the model arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..nn import BinaryConv2d, ScaleFactor
from ..nn.sign import binary_sign

__all__ = ["Bop", "bop_param_groups", "build_bop"]


class Bop(torch.optim.Adam):
    """Bop on the parameter groups marked ``bop=True`` (their ``lr``/``weight_decay`` are unused), Adam
    (``lr``, ``betas``, ``eps``, ``weight_decay``) on all the others. ``state[p]["momentum"]`` is ``m``,
    ``state[p]["step"]`` counts Bop's steps."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma: float = 1e-4,
        threshold: float = 1e-8,
    ) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"Bop's gamma (adaptivity rate) must be in (0, 1], got {gamma}")
        if threshold < 0.0:
            raise ValueError(f"Bop's threshold must be >= 0, got {threshold}")
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        extra = {"bop": False, "gamma": float(gamma), "threshold": float(threshold)}
        self.defaults.update(extra)
        for group in self.param_groups:
            for key, value in extra.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["bop"]:
                continue
            gamma, threshold = group["gamma"], group["threshold"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:  # "step" too: Adam's state loading expects it for every state
                    state["step"] = torch.tensor(0.0)
                    state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m = state["momentum"]
                m.mul_(1.0 - gamma).add_(p.grad, alpha=gamma)
                p.mul_(torch.where(p * m > threshold, -1.0, 1.0).to(p.dtype))
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g["bop"]]
        try:
            super().step()
        finally:
            self.param_groups = groups
        return loss


def bop_param_groups(
    model: nn.Module, weight_decay: float, binary_weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """``real`` (Adam, ``weight_decay``), ``scales`` (scale factors: Adam, ``binary_weight_decay``) and
    ``bop`` (the binary weights of every weight-binarizing ``BinaryConv2d``)."""
    bop_ids: set[int] = set()
    scale_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BinaryConv2d) and module.binarize_weights:
            bop_ids.add(id(module.weight))
        if isinstance(module, ScaleFactor):
            scale_ids.update(id(p) for p in module.parameters())
    real, scales, binary = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (binary if id(p) in bop_ids else scales if id(p) in scale_ids else real).append(p)
    groups = [{"params": real, "weight_decay": weight_decay, "name": "real"}]
    if scales:
        groups.append({"params": scales, "weight_decay": binary_weight_decay, "name": "scales"})
    if binary:
        groups.append({"params": binary, "weight_decay": 0.0, "name": "bop", "bop": True})
    return groups


def build_bop(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    binary_weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    gamma: float = 1e-4,
    threshold: float = 1e-8,
) -> Bop:
    """:class:`Bop` over :func:`bop_param_groups`; the binary weights are set to their signs first (the
    weights the forward used). Raises if a binary layer centres its weights."""
    centred = [n for n, m in model.named_modules() if isinstance(m, BinaryConv2d) and m.binarize_weights
               and m.centre_weights]  # fmt: skip
    if centred:
        raise ValueError(
            f"Bop flips binary weights directly, but {len(centred)} layers binarize centred weights "
            f"(e.g. {centred[0]!r}): build the model with centre_weights=False (optimizer=bop does this)"
        )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryConv2d) and m.binarize_weights:
                m.weight.copy_(binary_sign(m.weight))
    groups = bop_param_groups(model, weight_decay, binary_weight_decay)
    return Bop(
        groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma, threshold=threshold
    )
