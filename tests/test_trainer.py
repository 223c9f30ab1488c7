"""The training core without Hydra: Trainer, TrainState, Checkpointer and the tracker as plain Python."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import xnorpp  # noqa: F401  (registers the binary ResNets with timm)
from xnorpp.data import build_datasets
from xnorpp.engine import (
    Callback,
    Checkpointer,
    Trainer,
    TrainerOptions,
    TrainState,
    build_optimizer,
    build_scheduler,
)
from xnorpp.engine.loaders import build_loaders
from xnorpp.track import WandbTracker

CPU = torch.device("cpu")


def _trainer(ckpt_dir: Path, epochs: int, tracker: WandbTracker, **extra: object) -> Trainer:
    torch.manual_seed(0)
    train_ds, val_ds, info = build_datasets("synthetic", image_size=16, num_samples=64, augment=False)
    train_loader, val_loader, _ = build_loaders(train_ds, val_ds, batch_size=16, seed=0)
    model = timm.create_model("resnet18_preact_bin", num_classes=info.num_classes, in_chans=info.in_chans,
                              input_size=16, stem="small", widths=(8, 16, 32, 64))  # fmt: skip
    optimizer = build_optimizer(model, "sgd", lr=0.05, weight_decay=1e-5)
    scheduler = build_scheduler(optimizer, "cosine", epochs=epochs, updates_per_epoch=len(train_loader))
    return Trainer(model, optimizer, scheduler, train_loader, val_loader, device=CPU,
                   options=TrainerOptions(epochs=epochs, log_every=100), checkpointer=Checkpointer(ckpt_dir),
                   tracker=tracker, meta={"model_args": {"name": "resnet18_preact_bin"}}, **extra)  # fmt: skip


class Counter(Callback):
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_epoch_end(self, trainer: Trainer, state: TrainState, row: dict[str, float]) -> None:
        self.epochs.append(int(row["epoch"]))


def test_a_trainer_fits_and_checkpoints_without_hydra(tmp_path: Path) -> None:
    counter = Counter()
    with WandbTracker(mode="disabled") as tracker:
        results = _trainer(tmp_path / "ckpt", 2, tracker, callbacks=[counter]).fit(TrainState())
    assert (results["epochs"], results["global_step"], counter.epochs) == (2, 8, [1, 2])
    assert 0.0 <= results["best/val/top1"] <= 100.0 and len(results["history"]) == 2
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"last.pt", "best.pt"}


def test_a_checkpointer_resumes_a_trainer_exactly(tmp_path: Path) -> None:
    with WandbTracker(mode="disabled") as tracker:
        straight = _trainer(tmp_path / "a", 3, tracker)
        straight.fit(TrainState())
        first = _trainer(tmp_path / "b", 3, tracker)
        first.options = TrainerOptions(epochs=2, log_every=100)  # stopped after two of three epochs
        first.fit(TrainState())
        resumed = _trainer(tmp_path / "b", 3, tracker)
        path, ckpt = resumed.checkpointer.find()
        assert path.name == "last.pt"
        state = Checkpointer.restore(ckpt, resumed.model, resumed.optimizer)
        assert (state.epoch, state.global_step, len(state.history)) == (2, 8, 2)
        results = resumed.fit(state)
    assert results["global_step"] == 12
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    from xnorpp.engine.checkpoint import CheckpointError

    stored = {"model_args": {"name": "resnet18_preact_bin", "scale": "rank1"}}
    Checkpointer.check_model(
        stored, {"name": "resnet18_preact_bin", "scale": "rank1", "kwargs": {}}, tmp_path
    )
    with pytest.raises(CheckpointError, match="scale: checkpoint 'rank1' vs config 'channel'"):
        Checkpointer.check_model(stored, {"name": "resnet18_preact_bin", "scale": "channel"}, tmp_path)
