"""How runs are named, grouped and tagged, shared by the trainer's wandb runs and the sweep report.

A *configuration* is everything that changes what a run learns: its group choices and command-line
values, minus the seed (averaged over) and the settings in :data:`NOT_CONFIG`. Runs of one
configuration share a wandb group (``<task>/<configuration>``), so wandb's default grouping shows the
mean and spread over seeds; the launch (a sweep's directory name) is a config key and a tag instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

__all__ = [
    "GROUP_MAX",
    "NOT_CONFIG",
    "config_overrides",
    "is_config_key",
    "run_group",
    "run_name",
    "run_tags",
]

# Keys that never make two runs different configurations: the seed (averaged over) and settings that
# change where or how fast a run goes, not what it learns (the speed switches give bit-identical
# results). ``sweep`` is the preset that only set up Hydra's sweep; ``reference`` is the published number
# an experiment preset reproduces. Prefix match on dots: ``logger`` also covers ``logger.wandb.mode``.
NOT_CONFIG = (
    "seed", "sweep", "hydra", "logger", "tags", "data.root", "data.num_workers", "trainer.threads",
    "trainer.log_every", "trainer.health_every", "trainer.checkpoint", "trainer.device", "trainer.kernels",
    "trainer.int8_conv", "trainer.malloc", "ckpt_path", "reference",
)  # fmt: skip
GROUP_MAX = 128  # wandb's limit on a group name
TAG_GROUPS = ("binarization", "scale", "data", "optimizer", "scheduler", "model", "experiment")
_IN_NAME = ("binarization", "scale")  # shown by the run name itself


def is_config_key(key: str, ignore: Iterable[str] = ()) -> bool:
    """Does ``key`` (dotted, ``+``/``~`` prefixes allowed) change what a run learns?"""
    key = key.lstrip("+~")
    return not any(key == k or key.startswith(k + ".") for k in (*NOT_CONFIG, *ignore))


def config_overrides(overrides: Iterable[str]) -> list[str]:
    """The command-line overrides that define the configuration beyond binarization and scale, sorted."""
    return sorted(o.lstrip("+~") for o in overrides if is_config_key(o.partition("=")[0], ignore=_IN_NAME))


def run_name(binarization: str, scale: str, seed: int | None = None) -> str:
    """``full_binary-rank1-s0``; a real-valued run has no scale (``fp-s0``)."""
    parts = [binarization] if binarization == "fp" else [binarization, scale]
    return "-".join([*parts, *([f"s{seed}"] if seed is not None else [])])


def run_group(task_name: str, binarization: str, scale: str, overrides: Iterable[str]) -> str:
    """``<task>/<configuration>``, e.g. ``sweep_binarization/full_binary-rank1 trainer.epochs=3``; names
    longer than wandb takes end in a hash of the whole."""
    group = " ".join([f"{task_name}/{run_name(binarization, scale)}", *config_overrides(overrides)])
    if len(group) > GROUP_MAX:
        digest = hashlib.sha1(group.encode()).hexdigest()[:10]
        group = f"{group[: GROUP_MAX - len(digest) - 1]}~{digest}"
    return group


def run_tags(choices: Mapping[str, str], launch: str | None, extra: Iterable[str] = ()) -> list[str]:
    """``group:choice`` for the groups in :data:`TAG_GROUPS` that apply (no scale on a real-valued run),
    the launch, and the user's own tags."""
    real = choices.get("binarization") == "fp"
    tags = [f"{k}:{v}" for k, v in choices.items() if k in TAG_GROUPS and not (real and k == "scale")]
    return [*tags, *([f"launch:{launch}"] if launch else []), *map(str, extra)]
