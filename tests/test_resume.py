"""Reliability: exact resume after SIGKILL, preemption by SIGTERM, checkpoint safety, clear errors."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from xnorpp.engine.checkpoint import (
    CheckpointError,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
    temporary_path,
)
from xnorpp.run import REQUEUE_EXIT_CODE, train

# Real bundled data with augmentation on, so data order and augmentation randomness are both exercised.
ARGS = [
    "data.batch_size=16", "data.eval_batch_size=100", "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=2", "trainer.epochs=2", "trainer.checkpoint.every_steps=3",
    "trainer.log_every=100", "trainer.threads=1", "logger=none",
]  # fmt: skip


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *ARGS, *extra, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    p = _start(run_dir, *extra)
    out, _ = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared:\n{proc.stdout.read()}"
        assert time.time() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def _final(run_dir: Path) -> tuple[dict, dict]:
    results = json.loads((run_dir / "results.json").read_text())
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return results, state


def _assert_identical(a_dir: Path, b_dir: Path) -> None:
    (ra, sa), (rb, sb) = _final(a_dir), _final(b_dir)
    for key in [
        "val/top1",
        "val/top5",
        "val/loss",
        "train/loss",
        "train/top1",
        "best/val/top1",
        "global_step",
    ]:
        assert ra[key] == rb[key], (key, ra[key], rb[key])
    assert [h["val/loss"] for h in ra["history"]] == [h["val/loss"] for h in rb["history"]]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = _run(run_dir)
    assert done.returncode == 0, done.stdout
    return run_dir


@pytest.mark.slow  # in `pytest -m slow`: keeps the default run under 10 minutes
def test_sigkill_then_rerun_resumes_exactly(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    proc = _start(run_dir)
    _wait_for(run_dir / "checkpoints" / "step_000000003.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists()
    again = _run(run_dir)  # the identical command, as a SLURM requeue would run it
    assert again.returncode == 0, again.stdout
    assert "resumed from" in again.stdout
    _assert_identical(reference, run_dir)


@pytest.mark.slow  # in `pytest -m slow`: keeps the default run under 10 minutes
def test_sigterm_checkpoints_after_the_step_and_asks_for_requeue(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "preempted"
    proc = _start(run_dir)
    _wait_for(run_dir / "checkpoints" / "step_000000003.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    assert "SIGTERM" in out
    newest = find_resumable(run_dir / "checkpoints")
    assert newest is not None and newest[1]["state"]["global_step"] >= 3
    again = _run(run_dir)
    assert again.returncode == 0, again.stdout
    _assert_identical(reference, run_dir)


def test_ckpt_path_resumes_from_a_given_file(make_cfg, tmp_path: Path) -> None:
    first = train(make_cfg("trainer.checkpoint.every_steps=1", out=tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "step_000000001.pt"
    resumed = train(make_cfg(f"ckpt_path={ckpt}", out=tmp_path / "b"))
    assert resumed["global_step"] == first["global_step"] == 2
    assert resumed["val/loss"] == first["val/loss"]


def _ckpt(step: int, epoch: int, w: torch.Tensor | None = None, **extra: object) -> dict:
    state = {"global_step": step, "epoch": epoch, "batch_in_epoch": 0}
    return {"model": {"w": torch.ones(3) if w is None else w}, "state": state, **extra}


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    old = save_checkpoint(_ckpt(1, 0, tag="old"), tmp_path / "step_000000001.pt")
    new = save_checkpoint(_ckpt(2, 0, tag="new"), tmp_path / "step_000000002.pt")
    new.write_bytes(new.read_bytes()[: new.stat().st_size // 2])  # truncated, as by a crash mid-copy
    with pytest.warns(UserWarning, match="unreadable or corrupt"):
        found = find_resumable(tmp_path)
    assert found is not None and found[0] == old and found[1]["tag"] == "old"


def test_checkpoints_load_with_weights_only_and_refuse_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Path("/etc/passwd")}, path)  # an arbitrary python object
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_takes_the_checkpoint_furthest_into_training_whatever_its_name(tmp_path: Path) -> None:
    save_checkpoint(_ckpt(6, 0), tmp_path / "step_000000006.pt")
    save_checkpoint(_ckpt(8, 1), tmp_path / "last.pt")  # the end of epoch 0, at step 8
    save_checkpoint(_ckpt(99, 9), tmp_path / "best.pt")  # never resumed from
    assert find_resumable(tmp_path)[0].name == "last.pt"
    save_checkpoint(_ckpt(8, 0), tmp_path / "step_000000008.pt")  # the same step, before the epoch ended
    assert find_resumable(tmp_path)[0].name == "last.pt"
    save_checkpoint(_ckpt(9, 1), tmp_path / "step_000000009.pt")
    assert find_resumable(tmp_path)[0].name == "step_000000009.pt"
    save_checkpoint(_ckpt(12, 1), tmp_path / "renamed.pt")  # any name
    assert find_resumable(tmp_path)[0].name == "renamed.pt"


_WRITE_FAILED = r"could not write checkpoint {} \({}: .*\); [0-9.]+ MiB free on its filesystem"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = save_checkpoint(_ckpt(1, 0), tmp_path / "last.pt")
    temporary_path(target).symlink_to("/dev/full")  # every write of the temporary file fails with ENOSPC
    with pytest.raises(CheckpointError, match=_WRITE_FAILED.format(re.escape(str(target)), "OSError")) as e:
        save_checkpoint(_ckpt(2, 0, torch.zeros(3)), target)
    assert "No space left on device" in str(e.value) and "the previous checkpoint is intact" in str(e.value)
    assert torch.equal(load_checkpoint(target)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[Path, str], Path]]:
    """Mounts a tmpfs of a given size at a path (root only: skips elsewhere); unmounts afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                               capture_output=True).returncode:  # fmt: skip
            pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_keeps_the_previous_checkpoint(
    small_disk: Callable[[Path, str], Path], tmp_path: Path
) -> None:
    disk = small_disk(tmp_path / "small", "2m")
    target = save_checkpoint(_ckpt(1, 0), disk / "last.pt")
    with pytest.raises(
        CheckpointError, match=_WRITE_FAILED.format(re.escape(str(target)), "RuntimeError")
    ) as e:
        save_checkpoint(_ckpt(2, 0, torch.zeros(1 << 20)), target)  # 4 MiB: torch.save's zip writer fails
    assert "the disk is full: free space or move the run directory" in str(e.value)
    assert torch.equal(load_checkpoint(target)["model"]["w"], torch.ones(3))
    assert [p.name for p in disk.iterdir()] == ["last.pt"]


def test_training_on_a_full_disk_logs_the_failed_write_and_keeps_the_checkpoint_before(
    make_cfg, small_disk: Callable[[Path, str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    disk = small_disk(out / "checkpoints", "120m")  # one checkpoint of this model (~90 MB) fits, not two
    with caplog.at_level(logging.ERROR, logger="xnorpp"):
        results = train(
            make_cfg("trainer.checkpoint.every_steps=1", "trainer.checkpoint.keep_last=3", out=out)
        )
    assert results["global_step"] == 2  # training went on
    failed = [r.getMessage() for r in caplog.records if "could not write checkpoint" in r.getMessage()]
    assert failed and f"{disk}/step_000000002.pt" in failed[0] and "the disk is full" in failed[0], failed
    assert [p.name for p in disk.iterdir()] == ["step_000000001.pt"]  # intact, no temporary file
    assert load_checkpoint(disk / "step_000000001.pt")["state"]["global_step"] == 1


def test_checkpoint_of_another_variant_is_refused(make_cfg, tmp_path: Path) -> None:
    train(make_cfg(out=tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    with pytest.raises(
        CheckpointError, match="binarization: checkpoint 'real_downsample' vs config 'full_binary'"
    ):
        train(make_cfg("binarization=full_binary", f"ckpt_path={ckpt}", out=tmp_path / "b"))


def test_non_finite_loss_stops_with_the_step_or_is_skipped(make_cfg, tmp_path: Path) -> None:
    from xnorpp.engine import NonFiniteLossError

    blow_up = [
        "binarization=fp",
        "optimizer.lr=1e30",
        "trainer.limit_train_batches=4",
        "trainer.checkpoint.every_steps=1",
    ]
    with pytest.raises(NonFiniteLossError, match="at global step"):
        train(make_cfg(*blow_up, out=tmp_path / "a"))
    assert (tmp_path / "a" / "checkpoints" / "step_000000001.pt").is_file()  # the last good one is kept
    results = train(make_cfg(*blow_up, "trainer.on_nonfinite=skip", out=tmp_path / "b"))
    assert results["skipped_steps"] >= 1


def test_wandb_online_without_a_key_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xnorpp.track import WandbTracker

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start = time.time()
    tracker = WandbTracker(mode="online", dir=tmp_path, config={"a": 1}, init_timeout=10)
    try:
        assert tracker.status == "offline" and tracker.enabled
        tracker.log({"x": 1.0, "global_step": 1})
    finally:
        tracker.finish()
    assert time.time() - start < 60
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_key_without_a_reachable_server_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xnorpp.track import WandbTracker

    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start = time.time()
    tracker = WandbTracker(mode="online", dir=tmp_path, init_timeout=5)
    try:
        assert tracker.status == "offline" and tracker.enabled
        tracker.log({"x": 1.0, "global_step": 1})
    finally:
        tracker.finish()
    assert time.time() - start < 60  # bounded by init_timeout, not wandb's ~100 s of retries


def test_a_preempted_run_finishes_its_wandb_run_as_preempting_and_counts_the_attempts(
    make_cfg, tmp_path: Path
) -> None:
    """SIGTERM in the middle of an epoch (a real signal to this process): the wandb run is finished,
    marked preempting, before the hand-over; the resumed run counts 2 attempts and 1 requeue."""
    from xnorpp.run import Preempted
    from xnorpp.track.wandb_file import read_records

    out = tmp_path / "run"
    cfg = make_cfg("logger=wandb", "logger.wandb.mode=offline", "logger.wandb.log_model_summary=false",
                   "trainer.limit_train_batches=6", "trainer.checkpoint.every_steps=2", out=out)  # fmt: skip

    def signal_after_the_first_checkpoint() -> None:
        while not (out / "checkpoints" / "step_000000002.pt").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_after_the_first_checkpoint, daemon=True).start()
    with pytest.raises(Preempted) as stopped:
        train(cfg)
    assert stopped.value.code == REQUEUE_EXIT_CODE
    (first,) = out.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.time() + 60  # wandb's service process finishes writing the file after the run returns
    records = read_records(first)
    while "exit" not in [r.WhichOneof("record_type") for r in records]:
        assert time.time() < deadline, "the wandb run was not finished"
        time.sleep(0.1)
        records = read_records(first)
    assert "preempting" in [r.WhichOneof("record_type") for r in records]
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [REQUEUE_EXIT_CODE]
    results = train(cfg)  # the requeued run
    assert (results["global_step"], results["attempts"], results["requeues"]) == (6, 2, 1)
    assert results["wall_time_s"] > time.time() - first.stat().st_mtime  # the first attempt counts too
