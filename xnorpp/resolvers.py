"""OmegaConf resolvers the configs use (``conf/hydra/launcher/slurm.yaml``); no heavy imports, so that
``train.py`` registers them before Hydra composes (importing :mod:`xnorpp` registers them too)."""

from __future__ import annotations

from omegaconf import OmegaConf

__all__ = ["register", "tasks_per_node"]


def tasks_per_node(gpus_per_node: int | None) -> int:
    """One DDP process per GPU, one on a node without GPUs (``gpus_per_node`` 0 or null)."""
    return max(1, int(gpus_per_node or 0))


def register() -> None:
    """Register ``${xnorpp.tasks_per_node:...}`` (idempotent)."""
    OmegaConf.register_new_resolver("xnorpp.tasks_per_node", tasks_per_node, replace=True)
