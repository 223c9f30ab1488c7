"""What the wandb dashboard shows, read back from the offline run files of real training runs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from wandb_run_file import RunFile

from xnorpp.engine.health import BinarizationHealth
from xnorpp.run import train
from xnorpp.track import WandbTracker
from xnorpp.track.wandb_tracker import histogram_counts

# a short binary run with health telemetry every other step and wandb offline (the default logger)
CLI = [
    "data=synthetic", "data.image_size=16", "data.num_samples=64", "data.batch_size=8", "data.eval_batch_size=16",
    "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "trainer.log_every=2", "trainer.health_every=2",
    "trainer.threads=1", "trainer.kernels=eager", "binarization=full_binary", "logger.wandb.log_model_summary=false",
]  # fmt: skip


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *CLI, *extra, f"hydra.run.dir={run_dir}"]
    # a shell's environment: no wandb service shared with this test process (in-process runs start one)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _run(run_dir: Path, *extra: str) -> dict:
    proc = _start(run_dir, *extra)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, RunFile]:
    run_dir = tmp_path_factory.mktemp("dashboard")
    results = _run(run_dir, "trainer.epochs=3")
    (run_file,) = RunFile.of_run_dir(run_dir)
    return results, run_file


def test_best_val_top1_is_the_headline_and_finals_do_not_overwrite_it(cli_run: tuple[dict, RunFile]) -> None:
    results, f = cli_run
    assert f.exit_codes == [0]
    val = [h["val/top1"] for h in results["history"]]
    assert f.summary["best/val/top1"] == results["best/val/top1"] == max(val)
    assert f.summary["best/epoch"] == results["best/epoch"] and "best/val/top5" in f.summary
    assert f.summary["val/top1"] == {"max": max(val)}  # a summary over epochs, never the last value
    assert f.summary["final/val/top1"] == results["val/top1"] == val[-1]
    assert f.metrics["val/top1"].summary.max and f.metrics["val/top1"].step_metric == "epoch"


def test_one_x_axis_per_kind_of_key(cli_run: tuple[dict, RunFile]) -> None:
    results, f = cli_run
    steps = {"val/*": "epoch", "train_epoch/*": "epoch", "train/*": "global_step", "health/*": "global_step",
             "health_layer/*": "global_step", "val/top5": "epoch", "val/loss": "epoch"}  # fmt: skip
    assert {k: f.metrics[k].step_metric for k in steps} == steps
    for row in f.history:  # every row carries the x-axis of its keys
        if any(k.startswith(("train/", "health")) for k in row):
            assert "global_step" in row and "epoch" in row, row
        if any(k.startswith(("val/", "train_epoch/")) for k in row):
            assert row["epoch"] in (1, 2, 3), row
    val_rows = f.rows_with("val/top1")
    assert [r["epoch"] for r in val_rows] == [1, 2, 3]
    assert [r["val/top1"] for r in val_rows] == [h["val/top1"] for h in results["history"]]


def test_per_step_and_per_epoch_values_have_their_own_keys(cli_run: tuple[dict, RunFile]) -> None:
    results, f = cli_run
    for row in f.history:
        assert not ("train/loss" in row and "val/top1" in row), row  # no zig-zag of two kinds in one key
    epoch_rows = f.rows_with("train_epoch/loss")
    assert [r["train_epoch/loss"] for r in epoch_rows] == [h["train/loss"] for h in results["history"]]
    assert len(f.rows_with("train/loss")) == 3 * 2  # every log_every=2 of 4 steps, 3 epochs
    # the learning rate every step, so warm restarts show (SGDR: T_0 = 1 epoch)
    lr_rows = f.rows_with("train/lr")
    assert [r["global_step"] for r in lr_rows] == list(range(1, 13))
    lrs = [r["train/lr"] for r in lr_rows]
    assert lrs[4] > lrs[3]  # the restart at the start of epoch 2


def test_health_is_averaged_under_health_and_per_layer_under_its_own_prefix(
    cli_run: tuple[dict, RunFile],
) -> None:
    _, f = cli_run
    rows = f.rows_with("health/flip")
    assert [r["global_step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    keys = {k for r in rows for k in r}
    assert {"health/flip", "health/frozen", "health/act_in_window", "health/scale_mean"} <= keys
    assert all(k.count("/") == 1 for k in keys if k.startswith("health/"))  # averages only
    assert len([k for k in keys if k.startswith("health_layer/") and k.endswith("/flip")]) == 19
    assert any(k.startswith("hist/") and k.endswith("/gamma/_type") for k in keys)


def test_group_name_tags_and_files(cli_run: tuple[dict, RunFile]) -> None:
    results, f = cli_run
    assert f.run.display_name == "full_binary-rank1-s0"
    assert f.run.run_group.startswith("train/full_binary-rank1 ") and "seed" not in f.run.run_group
    assert {"binarization:full_binary", "scale:rank1", "data:synthetic"} <= set(f.run.tags)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "results.json", "train.log"} <= set(f.files)
    run_files = Path(results["wandb_dir"]) / "files"
    assert json.loads((run_files / "results.json").read_text())["best/val/top1"] == results["best/val/top1"]
    assert "val top-1" in (run_files / "train.log").read_text()


def test_a_real_valued_run_is_not_tagged_with_a_scale(make_cfg, tmp_path: Path) -> None:
    results = train(make_cfg("binarization=fp", "logger=wandb", "logger.wandb.log_model_summary=false"))
    (f,) = RunFile.of_run_dir(tmp_path / "run")
    assert f.run.display_name == "fp-s0" and f.run.run_group == "train/fp"
    assert not any(t.startswith("scale:") for t in f.run.tags) and "binarization:fp" in f.run.tags
    assert results["wandb_mode"] == "offline"


def test_after_a_kill_the_resumed_run_holds_every_epoch(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    proc = _start(run_dir, "trainer.epochs=3")
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists():  # written after epoch 1 (and its validation)
        assert proc.poll() is None and time.time() < deadline, "no epoch finished"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    results = _run(run_dir, "trainer.epochs=3")  # the identical command: resumes
    first, resumed = RunFile.of_run_dir(run_dir)  # one file per process
    assert resumed.run.run_id == first.run.run_id and resumed.exit_codes == [0]  # the same run continues
    assert [r["epoch"] for r in resumed.rows_with("val/top1")] == [1, 2, 3]
    assert [r["val/top1"] for r in resumed.rows_with("val/top1")] == [
        h["val/top1"] for h in results["history"]
    ]
    assert resumed.summary["best/val/top1"] == results["best/val/top1"]


# ------------------------------------------------------------------------------------ telemetry guards
def test_histograms_of_degenerate_values() -> None:
    tight = torch.tensor([1.0, 1.0000001], dtype=torch.float32)  # one float32 ulp apart
    with pytest.raises(ValueError, match="Too many bins"):
        np.histogram(tight.numpy(), bins=64)  # what wandb.Histogram does with it
    for values in (tight, torch.ones(5), torch.tensor([1.0, float("nan"), float("inf"), 2.0])):
        counts, edges, dropped = histogram_counts(values)
        assert counts.sum() == int(torch.isfinite(values).sum()) and len(edges) == 65
        assert dropped == int((~torch.isfinite(values)).sum())
    for values in (torch.tensor([]), torch.tensor([float("nan"), float("-inf")])):
        with pytest.raises(ValueError, match=r"empty|no finite"):
            histogram_counts(values)


DEGENERATE = {  # layer -> its Gamma, as the health telemetry sees it
    "layer1.0.conv1": torch.ones(8),
    "layer1.0.conv2": torch.tensor([1.0, 1.0000001]),
    "layer1.1.conv1": torch.tensor([1.0, float("nan"), 2.0]),
    "layer1.1.conv2": torch.full((4,), float("nan")),
    "layer2.0.conv1": torch.tensor([]),
    "layer2.0.conv2": torch.tensor([float("inf"), 3.0]),
}


def test_degenerate_telemetry_never_stops_a_training_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_gamma = BinarizationHealth._gamma
    names = {}

    def gamma(m: torch.nn.Module) -> torch.Tensor | None:
        return DEGENERATE.get(names.get(id(m)), real_gamma(m))

    def init(self: BinarizationHealth, model: torch.nn.Module, every: int) -> None:
        names.update({id(m): n for n, m in model.named_modules()})
        original_init(self, model, every)

    original_init = BinarizationHealth.__init__
    monkeypatch.setattr(BinarizationHealth, "_gamma", staticmethod(gamma))
    monkeypatch.setattr(BinarizationHealth, "__init__", init)
    caplog.set_level(logging.WARNING)
    cfg = make_cfg("binarization=full_binary", "logger=wandb", "logger.wandb.log_model_summary=false",
                   "trainer.health_every=1", "trainer.limit_train_batches=3")  # fmt: skip
    results = train(cfg)
    assert results["global_step"] == 3 and (tmp_path / "run" / "results.json").is_file()
    (f,) = RunFile.of_run_dir(tmp_path / "run")
    assert f.exit_codes == [0] and len(f.rows_with("health/flip")) == 3
    logged = {k.rsplit("/", 1)[0] for r in f.history for k in r if k.startswith("hist/")}
    for layer in ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer2.0.conv2", "layer3.0.conv1"):
        assert f"hist/{layer}/gamma" in logged, layer
    for layer in ("layer1.1.conv2", "layer2.0.conv1"):  # nothing finite to show: dropped
        assert f"hist/{layer}/gamma" not in logged
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for key in (
        "hist/layer1.1.conv2/gamma",
        "hist/layer2.0.conv1/gamma",
        "hist/layer1.1.conv1/gamma:nonfinite",
    ):
        assert sum(f"for {key};" in w for w in warnings) == 1, (key, warnings)  # once, not every step


def test_a_value_wandb_refuses_is_dropped_once_and_the_rest_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = WandbTracker(dir=tmp_path, config={"a": 1})
    caplog.set_level(logging.WARNING)
    for step in (1, 2):
        tracker.log({"global_step": step, "train/loss": 0.5 * step, "train/thing": object()})
    tracker.finish()
    (f,) = RunFile.of_run_dir(tmp_path)
    assert [r["train/loss"] for r in f.rows_with("train/loss")] == [0.5, 1.0], f.history
    assert sum("train/thing" in r.getMessage() for r in caplog.records) == 1
