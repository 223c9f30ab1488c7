"""Multi-stage training: stages in order, each from the previous one's weights, resumable at any point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, compose_cfg

import xnorpp.engine.trainer
from xnorpp.run import train
from xnorpp.stages import init_weights, stage_configs

# stage 1: binary activations, real weights; stage 2: binary weights too, 3 steps each, a step checkpoint at 2
TWO_STAGES = [
    "+stages={activations: {binarization: {name: activation_only}}, weights: {binarization: {name: full_binary}}}",
    "trainer.limit_train_batches=3",
    "trainer.checkpoint.every_steps=2",
    "optimizer=adam",
]


class Killed(RuntimeError):
    """Stands for a SIGKILL: the process ends right after a checkpoint, mid-epoch."""


def _kill_after(monkeypatch: pytest.MonkeyPatch, done: Path, step: int) -> None:
    """End the run after the step checkpoint of ``step`` once ``done`` (a stage's results.json) exists."""
    real = xnorpp.engine.trainer.train_one_epoch

    def train_one_epoch(*args: Any, **kwargs: Any) -> Any:
        write_checkpoint = kwargs["after_step"]

        def after_step(state: Any) -> None:
            write_checkpoint(state)
            if done.is_file() and state.global_step == step:
                raise Killed(f"killed at step {step}")

        return real(*args, **{**kwargs, "after_step": after_step})

    monkeypatch.setattr(xnorpp.engine.trainer, "train_one_epoch", train_one_epoch)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("stages") / "uninterrupted"
    return out, train(compose_cfg([*TINY, *TWO_STAGES], out))


def _weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(next(run.glob(f"stage*_{stage}")) / "checkpoints" / "last.pt", weights_only=True)[
        "model"
    ]


def test_two_stages_run_in_order_from_each_others_weights(make_cfg, uninterrupted: tuple[Path, dict]) -> None:
    out, results = uninterrupted
    assert [s["name"] for s in results["stages"]] == ["activations", "weights"]
    assert [s["binarization"] for s in results["stages"]] == ["activation_only", "full_binary"]
    one, two = (out / "stage1_activations", out / "stage2_weights")
    assert results["stages"][0]["init_from"] is None
    assert results["stages"][1]["init_from"] == str(one / "checkpoints" / "last.pt")
    assert (one / "results.json").is_file() and (two / "results.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert (
        saved["epochs"] == 2
        and saved["global_step"] == 6
        and [h["epoch"] for h in saved["history"]] == [1, 2]
    )
    assert (
        saved["val/top1"]
        == results["stages"][1]["val/top1"]
        == json.loads((two / "results.json").read_text())["val/top1"]
    )
    # stage 2 started from stage 1's real weights: its latent weights moved from there only by 3 steps of Adam
    w1, w2 = _weights(out, "activations"), _weights(out, "weights")
    key = "layer1.0.conv1.weight"
    assert (w2[key] - w1[key]).abs().max() < 3 * 1e-3 * 1.01 and not torch.equal(w1[key], w2[key])
    # a finished run does nothing when run again
    again = train(compose_cfg([*TINY, *TWO_STAGES], out))
    assert again["val/top1"] == results["val/top1"] and again["wall_time_s"] == results["wall_time_s"]


def test_a_run_killed_in_stage_2_resumes_exactly(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: tuple[Path, dict]
) -> None:
    reference_dir, reference = uninterrupted
    killed = tmp_path / "killed"
    with monkeypatch.context() as m:
        _kill_after(m, killed / "stage1_activations" / "results.json", step=2)
        with pytest.raises(Killed):
            train(make_cfg(*TWO_STAGES, out=killed))
    assert (killed / "stage1_activations" / "results.json").is_file()
    assert not (killed / "stage2_weights" / "results.json").exists()
    assert (killed / "stage2_weights" / "checkpoints" / "step_000000002.pt").is_file()
    resumed = train(make_cfg(*TWO_STAGES, out=killed))  # the same command again
    for key in ("val/top1", "val/loss", "train/loss", "global_step", "epochs"):
        assert resumed[key] == reference[key], key
    assert [h["val/loss"] for h in resumed["history"]] == [h["val/loss"] for h in reference["history"]]
    a, b = _weights(reference_dir, "weights"), _weights(killed, "weights")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_configs_share_a_wandb_group_and_let_a_stage_win(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*TWO_STAGES, "++stages.weights.trainer.epochs=3", "trainer.epochs=2", "logger.wandb.name=xp",
                   out=tmp_path / "r")  # fmt: skip
    (n1, c1), (n2, c2) = stage_configs(cfg, group="grp")
    assert (n1, n2) == ("activations", "weights")
    assert (c1.trainer.epochs, c2.trainer.epochs) == (2, 3)  # the stage's value wins for its stage
    assert c1.logger.wandb.group == c2.logger.wandb.group == "grp"
    assert (c1.logger.wandb.name, c2.logger.wandb.job_type) == ("xp-activations", "weights")
    assert c2.init_from == str(tmp_path / "r" / "stage1_activations" / "checkpoints" / "last.pt")
    assert "stage:weights" in c2.tags and c2.stages is None
    bad = make_cfg(*TWO_STAGES, "++stages.weights.trainer.epoch=3", out=tmp_path / "r")  # a typo
    with pytest.raises(ValueError, match=r"stages\.weights: Key 'epoch' is not in struct"):
        stage_configs(bad)


def test_init_from_loads_matching_weights_and_keeps_new_ones(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("binarization=fp", out=tmp_path / "fp"))
    ckpt = tmp_path / "fp" / "checkpoints" / "last.pt"
    results = train(make_cfg("binarization=real_downsample", f"init_from={ckpt}", "trainer.limit_train_batches=1",
                             "optimizer.lr=0", out=tmp_path / "bin"))  # fmt: skip
    assert results["init_from"] == str(ckpt)
    fp = torch.load(ckpt, weights_only=True)["model"]
    binary = torch.load(tmp_path / "bin" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert torch.equal(binary["layer2.0.conv1.weight"], fp["layer2.0.conv1.weight"])  # lr 0: as loaded
    assert "layer2.0.conv1.scale_factor.alpha" in binary and "layer2.0.conv1.scale_factor.alpha" not in fp
    wrong = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="no tensor of the checkpoint matches"):
        init_weights(wrong, ckpt)
