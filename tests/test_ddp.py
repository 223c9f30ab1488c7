"""torchrun DDP on CPU (gloo): one run directory, one results.json, one wandb run, metrics as one process;
decisions all ranks make alike (a preemption signal or a non-finite loss on one rank, a rank that fails)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from xnorpp.engine.checkpoint import find_resumable
from xnorpp.engine.memory import find_jemalloc
from xnorpp.run import REQUEUE_EXIT_CODE

# fp keeps the comparison about DDP (sign flips would amplify float-order differences); a small lr keeps
# per-process BatchNorm statistics (SyncBatchNorm is CUDA-only) from mattering much.
ARGS = [
    "data=synthetic", "data.image_size=16", "data.num_samples=100", "data.eval_batch_size=8", "trainer.epochs=1",
    "trainer.limit_val_batches=null", "binarization=fp", "optimizer.lr=0.001", "trainer.threads=1",
    "trainer.log_every=100", "trainer.device=cpu",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
for _key in ("LD_PRELOAD", "XNORPP_JEMALLOC"):  # train.py's allocator choice as on a fresh shell
    ENV.pop(_key, None)


def _torchrun_cmd(*args: str, entry: str = "train.py") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", entry, *args]


def _torchrun(
    *args: str, entry: str = "train.py", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(*args, entry=entry), cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    two = _torchrun(*ARGS, "data.batch_size=8", f"hydra.run.dir={root / 'two'}")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = _single(*ARGS, "data.batch_size=16", "logger=none", f"hydra.run.dir={root / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    return {"two": root / "two", "one": root / "one", "root": root}


def test_two_processes_write_one_run(runs: dict[str, Path]) -> None:
    two = runs["two"]
    assert sorted(p.name for p in runs["root"].iterdir()) == ["one", "two"]  # no stray per-rank directories
    results = json.loads((two / "results.json").read_text())
    assert results["world_size"] == 2
    # train.py re-ran itself with jemalloc preloaded (same pid: torchrun followed it), where installed
    want = ("jemalloc", "jemalloc") if find_jemalloc() else ("keep", "glibc")
    assert (results["malloc"], results["allocator"]) == want
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1
    assert (two / "checkpoints" / "last.pt").is_file()
    assert (two / ".hydra" / "config.yaml").is_file()


def test_metrics_match_one_process_at_the_same_global_batch(runs: dict[str, Path]) -> None:
    a = json.loads((runs["two"] / "results.json").read_text())
    b = json.loads((runs["one"] / "results.json").read_text())
    assert a["global_step"] == b["global_step"]
    assert a["val/images"] == b["val/images"] == 25
    assert a["val/loss"] == pytest.approx(b["val/loss"], rel=0.01)  # stated tolerance: 1% relative
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=0.02)  # 2%: BatchNorm sees 8, not 16 images


@pytest.mark.slow  # in `pytest -m slow`: keeps the default run under 10 minutes
def test_ddp_evaluation_is_exact(runs: dict[str, Path], tmp_path: Path) -> None:
    """25 validation images over 2 ranks (13 + 12, no padding): the same counts as one process."""
    ckpt = runs["one"] / "checkpoints" / "last.pt"
    two = _torchrun(*ARGS, "data.batch_size=8", "train=false", f"ckpt_path={ckpt}", "logger=none",
                    f"hydra.run.dir={tmp_path / 'eval2'}")  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = _single(*ARGS, "data.batch_size=8", "train=false", f"ckpt_path={ckpt}", "logger=none",
                  f"hydra.run.dir={tmp_path / 'eval1'}")  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "eval2" / "results.json").read_text())
    b = json.loads((tmp_path / "eval1" / "results.json").read_text())
    assert a["val/images"] == b["val/images"] == 25
    assert a["val/top1"] == b["val/top1"] and a["val/top5"] == b["val/top5"]
    assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-6)


# ------------------------------------------------------------------------------- decisions all ranks make
# 2 x 10 steps of 8 images per rank, a step checkpoint every 3: time to signal one rank mid-run
PREEMPT = [*ARGS, "binarization=real_downsample", "optimizer.lr=0.1", "data.num_samples=160", "data.batch_size=8",
           "trainer.epochs=2", "trainer.kernels=eager", "trainer.checkpoint.every_steps=3", "logger=none"]  # fmt: skip
# fp, 6 steps of 8 images per rank, a step checkpoint after every step; rank 1's third batch is bad
FAULTY = [*ARGS, "data.batch_size=8", "trainer.checkpoint.every_steps=1", "logger=none"]
THIRD_BATCH = {"FAULT_AFTER": "16", "FAULT_COUNT": "8"}


def _rank_pids(pid: int) -> dict[int, int]:
    """The torchrun workers under process ``pid``, by their RANK."""
    ranks: dict[int, int] = {}
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            pending += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if p != pid and rank and b"TORCHELASTIC_RUN_ID=" in b" ".join(env):
            ranks[int(rank[0][5:])] = p
    return ranks


def _same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for key in (
        "val/top1",
        "val/top5",
        "val/loss",
        "train/loss",
        "train/top1",
        "global_step",
        "skipped_steps",
    ):
        assert ra[key] == rb[key], (key, ra[key], rb[key])
    assert [h["train/loss"] for h in ra["history"]] == [h["train/loss"] for h in rb["history"]]
    sa, sb = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(v, sb["model"][k]) for k, v in sa["model"].items())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp_uninterrupted")
    done = _torchrun(*PREEMPT, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds rank 1's pid in Linux /proc")
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_and_resumes_exactly(
    uninterrupted: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen(_torchrun_cmd(*PREEMPT, f"hydra.run.dir={run_dir}"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step_000000003.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "no step checkpoint appeared"
            time.sleep(0.05)
        ranks = _rank_pids(proc.pid)
        os.kill(ranks[1], signal.SIGTERM)  # rank 1 only: rank 0, which writes checkpoints, is not signalled
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    # every rank exited with the requeue code (torchrun lists each; it exits 1 itself)
    exits = {int(pid) for pid in re.findall(rf"exitcode\s*: {REQUEUE_EXIT_CODE} \(pid: (\d+)\)", out)}
    assert exits == set(ranks.values()), out[-3000:]
    assert "another rank received SIGTERM: checkpointing after the current step" in out  # rank 0's log
    path, ckpt = find_resumable(run_dir / "checkpoints")
    step = ckpt["state"]["global_step"]
    assert path.name == f"step_{step:09d}.pt" and 3 < step < 20 and ckpt["attempts"]["requeues"] == 1
    again = _torchrun(*PREEMPT, f"hydra.run.dir={run_dir}")  # the same command, as a requeue runs it
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {path}" in again.stderr + again.stdout
    _same_run(uninterrupted, run_dir)  # train loss/top-1 of the resumed epoch included
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["attempts"], results["requeues"]) == (2, 1)
    assert (
        results["wall_time_s"] > json.loads((uninterrupted / "results.json").read_text())["wall_time_s"] / 4
    )


def test_nan_on_one_rank_stops_every_rank_with_the_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "nan"
    start = time.time()
    out = _torchrun(*FAULTY, f"hydra.run.dir={run_dir}", entry="tests/faulty_train.py",
                    env={"FAULT": "nan", **THIRD_BATCH})  # fmt: skip
    assert out.returncode != 0 and time.time() - start < 300
    text = out.stdout + out.stderr
    assert (
        "NonFiniteLossError: loss is not finite on 1 of 2 ranks (this rank's: nan) at global step 2" in text
    )
    assert re.search(r"loss is not finite on 1 of 2 ranks \(this rank's: [0-9.]+\) at global step 2", text)
    path, ckpt = find_resumable(run_dir / "checkpoints")  # the last good one is kept
    assert path.name == "step_000000002.pt" and ckpt["state"]["global_step"] == 2


def test_nan_on_one_rank_is_skipped_on_every_rank(tmp_path: Path) -> None:
    """Rank 0's third batch is NaN: every rank skips that step. Rank 0's BatchNorm statistics, which DDP
    hands to every rank at each forward and which its checkpoint holds, are restored: metrics stay finite."""
    env = {"FAULT": "nan", "FAULT_RANK": "0", **THIRD_BATCH}
    out = _torchrun(*FAULTY, "trainer.on_nonfinite=skip", f"hydra.run.dir={tmp_path}", entry="tests/faulty_train.py",
                    env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["skipped_steps"], results["global_step"]) == (1, 6)
    assert all(
        results[k] is not None and results[k] == results[k] for k in ("val/loss", "train/loss", "val/top1")
    )
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_error_on_one_rank_stops_the_others_promptly_with_a_clear_message(tmp_path: Path) -> None:
    """Ranks started as SLURM tasks are (no torchrun to stop the others): rank 1 cannot read an image."""
    env = {**ENV, "FAULT": "error", **THIRD_BATCH, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    cmd = [sys.executable, "tests/faulty_train.py", *FAULTY, f"hydra.run.dir={tmp_path / 'run'}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]  # fmt: skip
    start = time.time()
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.time() - start < 120, "a rank waited for the failed one"
    assert [p.returncode for p in procs] == [1, 1], outs
    assert "OSError: cannot read training image" in outs[1]
    assert "PeerFailedError: rank 0: a collective operation failed" in outs[0], outs[0][-3000:]
    assert "another rank most likely stopped with an error or was killed" in outs[0]
