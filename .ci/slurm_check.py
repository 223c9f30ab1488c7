"""The SLURM points on a real cluster, through ``train.py`` and ``hydra/launcher=slurm`` (submitit).

Run by ``.ci/slurm_check.sh`` (which starts a one-node cluster where none answers); needs 2 CPUs and
~6 GB free on the node. Each check prints one line; the script exits 1 on the first failure.

1. CPU-only sweep: ``hydra.launcher.gpus_per_node=0`` (tasks per node then 1), two jobs of 1 CPU: both
   finish, each ran 1 torch thread (``SLURM_CPUS_PER_TASK``).
2. A 2-rank DDP job (``tasks_per_node=2`` on CPUs), uninterrupted: the reference.
3. The same job, ``scancel --signal=USR2`` mid-run (what SLURM sends before the time limit): a step
   checkpoint, submitit's requeue, a resume that ends identical to the reference (weights and metrics),
   ``attempts``/``requeues`` 2/1, the wandb run of the first attempt finished and marked preempting, no
   wandb connection errors in the job's log.
4. The same with USR2 to rank 1 only (a ``kill``): the same outcome (every rank stops after the same step).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data=synthetic", "data.image_size=16", "data.batch_size=8", "data.eval_batch_size=32",
        "trainer.limit_val_batches=null", "trainer.log_every=100", "trainer.kernels=eager", "trainer.device=cpu"]  # fmt: skip
CPU_NODES = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_gb=6", "hydra.launcher.timeout_min=30"]  # fmt: skip
# 2 x 10 steps per rank, a step checkpoint every 3
DDP = [*TINY, "data.num_samples=160", "trainer.epochs=2", "trainer.checkpoint.every_steps=3",
       "hydra.launcher.tasks_per_node=2", "logger.wandb.mode=offline"]  # fmt: skip


def _sweep(sweep_dir: Path, *args: str) -> subprocess.Popen:
    """``train.py -m`` on the cluster's CPU nodes; its output goes to ``<sweep_dir>.log``."""
    cmd = [sys.executable, "train.py", "-m", *CPU_NODES, *args, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "WANDB_SILENT": "true"}
    with open(f"{sweep_dir}.log", "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    proc.wait(timeout=timeout)
    if proc.returncode != 0:
        log = Path(f"{proc.args[-1].split('=', 1)[1]}.log").read_text()
        raise AssertionError(f"{what}: exit {proc.returncode}\n{log[-4000:]}")


def _results(job: Path) -> dict[str, Any]:
    return json.loads((job / "results.json").read_text())


def _job_logs(sweep_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((sweep_dir / ".submitit").rglob("*_log.*")))


def _wait_for_step_checkpoint(proc: subprocess.Popen, job: Path, timeout: float = 600) -> str:
    """The SLURM job id (``N``, or ``N_I`` in a job array) once the job has written a step checkpoint."""
    deadline = time.time() + timeout
    while not list((job / "checkpoints").glob("step_*.pt")):
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"no step checkpoint in {job}: see {job.parent}.log")
        time.sleep(0.2)
    (job_id,) = [p.name for p in (job.parent / ".submitit").iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)]
    return job_id


def _task_pid(job_id: str, rank: int) -> int:
    """The pid of the job's task ``rank`` (this host: a one-node cluster)."""
    keys = [b"SLURM_ARRAY_JOB_ID", b"SLURM_ARRAY_TASK_ID"] if "_" in job_id else [b"SLURM_JOB_ID"]
    want = [*(part.encode() for part in job_id.split("_")), str(rank).encode()]
    for proc in Path("/proc").iterdir():
        try:
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if [env.get(k) for k in (*keys, b"SLURM_PROCID")] == want and b"submitit" in cmdline:
            return int(proc.name)
    raise AssertionError(f"no task {rank} of job {job_id} on this host")


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = _results(a), _results(b)
    for key in ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1", "global_step", "world_size"):
        assert ra[key] == rb[key], (key, ra[key], rb[key])
    sa, sb = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(v, sb["model"][k]) for k, v in sa["model"].items()), "weights differ"


def _wandb_exits(job: Path) -> list[tuple[bool, int]]:
    """(marked preempting, exit code) of each offline wandb run of a job, oldest first."""
    sys.path.insert(0, str(ROOT / "tests"))
    from wandb_run_file import wandb_records

    runs = []
    for path in sorted(job.glob("wandb/offline-run-*/run-*.wandb")):
        records = wandb_records(path)
        kinds = [r.WhichOneof("record_type") for r in records]
        exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
        runs.append(("preempting" in kinds, exits[-1] if exits else None))
    return runs


def check_cpu_sweep(root: Path) -> str:
    sweep = root / "cpu_sweep"
    _finish(_sweep(sweep, *TINY, "data.num_samples=64", "trainer.epochs=1", "trainer.limit_train_batches=2",
                   "binarization=fp,full_binary", "logger=none"), "CPU sweep")  # fmt: skip
    threads = [_results(sweep / j)["threads"] for j in ("0", "1")]
    assert threads == [1, 1], threads
    script = next((sweep / ".submitit").rglob("*_submission.sh")).read_text()
    assert "#SBATCH --gpus-per-node=0" in script and "#SBATCH --ntasks-per-node=1" in script, script
    return f"CPU-only sweep (gpus_per_node=0): 2 jobs done, torch threads {threads}, --ntasks-per-node=1"


def check_reference(root: Path) -> Path:
    sweep = root / "ddp_reference"
    _finish(_sweep(sweep, *DDP), "DDP reference")
    assert _results(sweep / "0")["world_size"] == 2
    return sweep / "0"


def check_preemption(root: Path, reference: Path, name: str, one_rank: bool) -> str:
    sweep = root / ("usr2_rank1" if one_rank else "usr2_job")
    proc = _sweep(sweep, *DDP)
    job_id = _wait_for_step_checkpoint(proc, sweep / "0")
    if one_rank:
        os.kill(_task_pid(job_id, 1), signal.SIGUSR2)
    else:
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    started = time.time()
    _finish(proc, name)
    job, logs = sweep / "0", _job_logs(sweep)
    assert "Requeued job" in logs and "resumed from" in (job / "train.log").read_text(), logs[-3000:]
    for error in ("MailboxClosedError", "ConnectionResetError", "BrokenPipeError"):
        assert error not in logs, error
    _assert_same_run(reference, job)
    results = _results(job)
    assert (results["attempts"], results["requeues"]) == (2, 1), results
    wandb = _wandb_exits(job)
    assert wandb[0] == (True, 124) and wandb[-1] == (False, 0), wandb
    return (f"{name}: requeued and resumed, identical to the uninterrupted run; attempts 2, requeues 1, "
            f"wall_time_s {results['wall_time_s']:.0f} (reference {_results(reference)['wall_time_s']:.0f}); "
            f"wandb runs (preempting, exit) {wandb}; {time.time() - started:.0f} s after the signal")  # fmt: skip


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="xnorpp-slurm-", dir=os.environ.get("SLURM_CHECK_DIR")))
    print(f"run directories under {root}", flush=True)
    checks = [
        lambda: check_cpu_sweep(root),
        lambda: f"2-rank DDP reference: {check_reference(root)}",
        lambda: check_preemption(root, root / "ddp_reference" / "0", "USR2 to the job (scancel)", False),
        lambda: check_preemption(root, root / "ddp_reference" / "0", "USR2 to rank 1 only (kill)", True),
    ]
    for check in checks:
        start = time.time()
        try:
            line = check()
        except AssertionError as e:
            print(f"FAILED: {e}", flush=True)
            return 1
        print(f"ok ({time.time() - start:.0f} s): {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
