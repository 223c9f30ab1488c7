"""Every option of every config group composes; presets and bad names behave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT, compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from xnorpp.data import DATASETS
from xnorpp.engine import OPTIMIZERS, SCHEDULERS
from xnorpp.engine.distill import DISTILLERS
from xnorpp.models import BINARIZATIONS
from xnorpp.nn import SCALES

GROUPS = [
    "model",
    "binarization",
    "scale",
    "data",
    "optimizer",
    "scheduler",
    "distill",
    "trainer",
    "logger",
    "experiment",
    "debug",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group: str, tmp_path: Path) -> None:
    options = _options(group)
    assert options, f"conf/{group} has no options"
    for option in options:
        extra = ["data.root=/data"] if group == "data" and option in ("imagenet", "imagefolder") else []
        extra += ["distill.teacher=t.pt"] if group == "distill" and option != "none" else []
        cfg = compose_cfg([f"{group}={option}", *extra], tmp_path)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_group_options_match_library_registries() -> None:
    assert set(_options("binarization")) == set(BINARIZATIONS)
    assert set(_options("scale")) == set(SCALES)
    assert set(_options("data")) == set(DATASETS)
    assert set(_options("optimizer")) == set(OPTIMIZERS)
    assert set(_options("scheduler")) == set(SCHEDULERS)
    assert set(_options("distill")) == set(DISTILLERS)
    assert set(_options("logger")) == {"wandb", "none"}
    assert {"fast", "overfit"} <= set(_options("debug"))


def test_required_keys_exist(tmp_path: Path) -> None:
    cfg = compose_cfg([], tmp_path)
    for key in ["trainer.epochs", "trainer.device", "data.root", "data.batch_size", "data.num_workers",
                "data.image_size", "optimizer.lr", "optimizer.weight_decay", "seed", "logger.wandb.mode"]:  # fmt: skip
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key


def test_default_is_the_originals_configuration(tmp_path: Path) -> None:
    cfg = compose_cfg([], tmp_path)
    assert cfg.model.name == "resnet18_preact_bin"
    assert cfg.binarization.name == "real_downsample"
    assert cfg.scale.name == "rank1"
    assert cfg.data.name == "mnist5k" and cfg.data.image_size == 32
    assert cfg.logger.wandb.mode == "offline"
    assert cfg.trainer.precision == "32"


def test_seed_experiment_matches_the_original_recipe(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=seed_resnet18_imagenet", "data.root=/data/imagenet"], tmp_path)
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.1 and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.nesterov is False and cfg.optimizer.weight_decay == 1e-5
    assert cfg.optimizer.binary_weight_decay == 0.0
    assert (
        cfg.scheduler.name == "cosine_restarts" and cfg.scheduler.t0_epochs == 1 and cfg.scheduler.t_mult == 2
    )
    assert cfg.trainer.epochs == 63 and cfg.data.batch_size == 256 and cfg.data.image_size == 224
    assert cfg.binarization.name == "real_downsample" and cfg.scale.name == "rank1"
    assert cfg.model.stem == "imagenet"
    twin = compose_cfg(["experiment=seed_resnet18_imagenet_binary_downsample", "data.root=/d"], tmp_path)
    assert twin.binarization.name == "full_binary" and twin.trainer.epochs == 63
    xnor = compose_cfg(["experiment=xnornet_resnet18_imagenet", "data.root=/d"], tmp_path)
    assert xnor.scale.name == "xnor" and xnor.optimizer.name == "adam" and xnor.scheduler.name == "step"
    assert xnor.trainer.epochs == 90


def test_method_presets_carry_their_papers_recipes(tmp_path: Path) -> None:
    bireal = compose_cfg(["experiment=bireal_resnet18_imagenet", "data.root=/d"], tmp_path)
    assert (bireal.model.block, bireal.model.estimator, bireal.scale.name) == (
        "bireal",
        "approx_sign",
        "magnitude_aware",
    )
    assert (bireal.optimizer.name, bireal.optimizer.lr, bireal.data.batch_size) == ("sgd", 0.01, 128)
    assert list(bireal.scheduler.milestones) == [10, 15] and bireal.optimizer.weight_decay == 0
    react = compose_cfg(["experiment=reactnet_resnet18_imagenet", "data.root=/d"], tmp_path)
    assert (react.model.block, react.scale.name, react.distill.name) == (
        "reactnet",
        "magnitude_aware",
        "distribution",
    )
    assert (react.optimizer.name, react.optimizer.lr, react.optimizer.lr_base_size) == ("adam", 2.5e-3, 512)
    assert react.scheduler.name == "linear" and react.trainer.epochs == 128
    one, two = (OmegaConf.merge(react, s) for s in react.stages.values())
    assert (one.binarization.name, one.optimizer.weight_decay) == ("activation_only", 1e-5)
    assert (two.binarization.name, two.optimizer.weight_decay) == ("real_downsample", 0.0)


# preset -> (top-1 it reproduces, where that number comes from)
REFERENCES = {
    "seed_resnet18_imagenet": (57.6, "original project README"),
    "seed_resnet18_imagenet_binary_downsample": (55.8, "original project README"),
    "xnornet_resnet18_imagenet": (51.2, "Rastegari et al., ECCV 2016 (XNOR-Net), Table 2"),
    "bwn_resnet18_imagenet": (60.8, "Rastegari et al., ECCV 2016 (XNOR-Net), Table 2"),
    "xnorpp_adam_resnet18_imagenet": (57.1, "Bulat & Tzimiropoulos, BMVC 2019 (XNOR-Net++)"),
    "xnorpp_resnet18_cifar10": (91.5, "Qin et al., CVPR 2020 (IR-Net)"),
    "bireal_resnet18_imagenet": (56.4, "Liu et al., ECCV 2018 (Bi-Real Net)"),
    "reactnet_resnet18_imagenet": (65.9, "Liu et al., ECCV 2020 (ReActNet)"),
}


def _total_epochs(cfg) -> int:
    """``trainer.epochs``, summed over the stages of a staged preset."""
    if not cfg.stages:
        return cfg.trainer.epochs
    return sum(OmegaConf.merge(cfg, stage or {}).trainer.epochs for stage in cfg.stages.values())


def test_every_experiment_carries_the_number_it_reproduces_and_its_recipe(tmp_path: Path) -> None:
    assert set(REFERENCES) == set(_options("experiment"))
    assert compose_cfg([], tmp_path).reference is None
    for preset, (top1, source) in REFERENCES.items():
        cfg = compose_cfg([f"experiment={preset}", "data.root=/d"], tmp_path)
        ref = cfg.reference
        assert ref.top1 == top1 and ref.source.startswith(source), preset
        assert (ref.data, ref.epochs) == (cfg.data.name, _total_epochs(cfg)), (
            preset
        )  # the preset's own recipe
        short = compose_cfg([f"experiment={preset}", "data=mnist5k", "trainer.epochs=3"], tmp_path)
        assert (short.reference.data, short.reference.epochs) == (
            ref.data,
            ref.epochs,
        )  # not moved by overrides


def test_wrong_option_lists_valid_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["binarization=ful_binary"], tmp_path)
    text = str(err.value) + str(err.value.__cause__)
    for name in BINARIZATIONS:
        assert name in text


def test_cfg_job_prints_the_composed_config_without_training(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "train.py", "experiment=seed_resnet18_imagenet", "--cfg", "job"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "cosine_restarts" in out.stdout and "epochs: 63" in out.stdout
    assert not list(tmp_path.iterdir())
