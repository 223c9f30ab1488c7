"""What Hydra says about the current job (group choices, overrides, sweep directory, launcher) and the
CPU threads it gets. Beside :mod:`xnorpp.run`, the only modules that know about Hydra; every function
here answers sensibly outside a Hydra job (the compose API, plain Python)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

__all__ = ["DEFAULT_THREADS", "JobInfo", "cpu_threads", "job_info"]

DEFAULT_THREADS = torch.get_num_threads()  # this process's own, for the jobs of a multirun that set none


@dataclass(frozen=True)
class JobInfo:
    """``choices``: every config group's choice (``hydra/*`` left out); ``overrides``: the command-line
    overrides; ``sweep_dir``: the multirun's directory, ``None`` for a single run."""

    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    sweep_dir: str | None = None


def job_info() -> JobInfo:
    """The current Hydra job's :class:`JobInfo` (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return JobInfo()
        hc = HydraConfig.get()
        choices = {
            k: str(v) for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra/")
        }
        sweep_dir = str(hc.sweep.dir) if str(hc.mode) == "RunMode.MULTIRUN" else None
        return JobInfo(choices, list(hc.overrides.task), sweep_dir)
    except Exception:  # compose API without hydra config, or Hydra internals changed
        return JobInfo()


def cpu_threads(threads: int | None) -> tuple[int, str]:
    """Torch threads for this job and where the number comes from: ``trainer.threads``, the SLURM
    allocation (``SLURM_CPUS_PER_TASK``, shared by torchrun's processes if it runs in one task), the joblib
    launcher's share of the cores, else this process's default (``OMP_NUM_THREADS`` or the cores)."""
    if threads:
        return int(threads), "trainer.threads"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
        return max(1, int(slurm) // local), f"SLURM_CPUS_PER_TASK={slurm}" + (
            f" / {local} processes" if local > 1 else ""
        )
    share = _launcher_threads()
    if share:
        return share, "the joblib launcher's share of the cores"
    return DEFAULT_THREADS, "the process's default"


def _launcher_threads() -> int | None:
    """Threads per job when Hydra's joblib launcher runs ``n_jobs`` jobs side by side on this machine."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        launcher = HydraConfig.get().launcher
        if "Joblib" not in str(launcher.get("_target_", "")):
            return None
        n_jobs = int(launcher.get("n_jobs") or -1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // (cores if n_jobs < 1 else min(n_jobs, cores)))
    except Exception:
        return None
