"""Shared fixtures: compose the real Hydra configs (as train.py does) with a temporary run directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from xnorpp import config_source

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

os.environ.setdefault("WANDB_SILENT", "true")
config_source.register()  # +sweep=NAME, as train.py does before Hydra composes
# One intra-op thread: tests are many small ops, where extra threads (and a shared, busy machine)
# cost more than they give. Benchmarks, not tests, measure speed.
torch.set_num_threads(1)

# Small, fast settings for smoke runs: synthetic 16x16 data, two steps, no wandb.
TINY = [
    "data=synthetic",
    "data.image_size=16",
    "data.num_samples=64",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "trainer.epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every=1",
    "logger=none",
    "trainer.threads=1",
    "trainer.kernels=eager",  # no compiling in every smoke run (test_train covers the compiled kernel)
]


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``overrides`` and point the run at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def _make(*overrides: str, tiny: bool = True, out: Path | None = None) -> DictConfig:
        return compose_cfg([*(TINY if tiny else []), *overrides], out or tmp_path / "run")

    return _make
