"""Open registries and Hydra ``_target_`` nodes: timm's optimizers and schedules by name, a user's own
module (``imports``), model arguments for ``timm.create_model``, losses and callbacks from the config."""

from __future__ import annotations

import itertools
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm.optim
import torch
from conftest import ROOT

from xnorpp.engine import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler
from xnorpp.engine.checkpoint import CheckpointError
from xnorpp.run import build_model, model_args_from_cfg, train

USER = str(ROOT / "tests" / "user_ext.py")


@pytest.fixture
def user_module() -> Iterator[str]:
    """``tests/user_ext.py`` for ``imports``; afterwards the registries as they were."""
    yield USER
    sys.modules.pop("user_ext", None)
    for registry, name in ((OPTIMIZERS, "user_sgd"), (SCHEDULERS, "user_halving")):
        if name in registry:
            registry.unregister(name)


def test_any_optimizer_timm_knows_trains_from_the_default_config(
    make_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    """``python train.py optimizer.name=lamb trainer.epochs=1`` (bundled data, 5 batches here)."""
    cfg = make_cfg(
        "optimizer.name=lamb", "trainer.epochs=1", "trainer.limit_train_batches=5", "logger=none", tiny=False
    )
    with caplog.at_level(logging.WARNING, logger="xnorpp"):
        results = train(cfg)
    assert results["epochs"] == 1 and results["global_step"] == 5 and results["train/loss"] > 0
    assert "optimizer lamb takes no nesterov: left out" in caplog.text  # the sgd preset's own key
    ckpt = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.pt", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["real", "binary"] and "trust_clip" in groups[0]  # timm's Lamb


def test_timm_optimizers_keep_the_weight_decay_groups() -> None:
    model = timm.create_model("resnet18_preact_bin", num_classes=10, input_size=32)
    opt = build_optimizer(
        model, "lion", lr=1e-4, weight_decay=0.05, binary_weight_decay=0.0, betas=[0.9, 0.99]
    )
    assert isinstance(opt, timm.optim.Lion)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"real": 0.05, "binary": 0.0}
    with pytest.raises(ValueError, match=r"unknown optimizer 'nosuch'.*OPTIMIZERS\.register"):
        build_optimizer(model, "nosuch", lr=0.1)


def test_a_schedule_timm_knows_steps_every_iteration(make_cfg) -> None:
    results = train(make_cfg("scheduler.name=poly", "trainer.limit_train_batches=4", "trainer.epochs=2"))
    assert results["global_step"] == 8
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "poly", epochs=2, updates_per_epoch=4, min_lr=0.0)
    lrs = []
    for step in range(8):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 1.0 and all(a > b for a, b in itertools.pairwise(lrs))  # a decay within the epochs
    with pytest.raises(ValueError, match="unknown scheduler 'nosuch'"):
        build_scheduler(opt, "nosuch", epochs=1, updates_per_epoch=1)


def test_a_users_module_registers_an_optimizer_and_a_schedule(make_cfg, user_module: str) -> None:
    cfg = make_cfg(f"imports=[{user_module}]", "optimizer.name=user_sgd", "scheduler.name=user_halving",
                   "optimizer.lr_base_size=null", "trainer.limit_train_batches=3")  # fmt: skip
    results = train(cfg)
    assert results["global_step"] == 3 and "user_sgd" in OPTIMIZERS and "user_halving" in SCHEDULERS
    ckpt = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        0.1 * 0.5**2
    )  # halved before steps 1, 2


def test_loss_and_callbacks_come_from_target_nodes(make_cfg, user_module: str, tmp_path: Path) -> None:
    one = "trainer.limit_train_batches=1"  # one step: the halved loss is exactly half (its gradient differs)
    plain = train(make_cfg(one, out=tmp_path / "plain"))
    events = tmp_path / "events.json"
    halved = train(make_cfg(one, f"imports=[{user_module}]", "loss._target_=user_ext.HalvedCrossEntropy",
                            "~loss.label_smoothing", "+callbacks.rec._target_=user_ext.EpochRecorder",
                            f"+callbacks.rec.path={events}", out=tmp_path / "halved"))  # fmt: skip
    assert halved["train/loss"] == pytest.approx(0.5 * plain["train/loss"], rel=1e-6)
    assert json.loads(events.read_text()) == [["start", 0], ["epoch", 1, True], ["end", 1]]
    smooth = train(make_cfg(one, "loss.label_smoothing=0.5", out=tmp_path / "smooth"))
    assert smooth["train/loss"] != plain["train/loss"]


def test_model_kwargs_reach_timm_create_model_and_the_checkpoint(make_cfg, tmp_path: Path) -> None:
    narrow = make_cfg("+model.kwargs.widths=[8,16,32,64]", out=tmp_path / "narrow")
    args = model_args_from_cfg(narrow, 10, 3)
    assert args["kwargs"] == {"widths": [8, 16, 32, 64]}
    assert build_model(args).fc.in_features == 64
    results = train(narrow)
    assert results["model_args"]["kwargs"] == {"widths": [8, 16, 32, 64]}
    assert results["params/total"] < 0.02 * train(make_cfg(out=tmp_path / "wide"))["params/total"]
    ckpt = tmp_path / "narrow" / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match=r"kwargs: checkpoint \{'widths'"):
        train(make_cfg(f"ckpt_path={ckpt}", out=tmp_path / "mismatch"))
    evaluated = train(make_cfg("+model.kwargs.widths=[8,16,32,64]", "train=false", f"ckpt_path={ckpt}",
                               out=tmp_path / "eval"))  # fmt: skip
    assert evaluated["val/top1"] == pytest.approx(results["val/top1"])


def test_an_unknown_import_names_itself(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="imports: no such file"):
        train(make_cfg(f"imports=[{tmp_path / 'missing.py'}]"))
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        train(make_cfg("imports=[no_such_module]"))
