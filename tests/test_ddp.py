"""torchrun DDP on CPU (gloo): one run directory, one results.json, one wandb run, metrics as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from xnorpp.engine.memory import find_jemalloc

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


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


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
