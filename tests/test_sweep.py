"""Sweeps: presets compose (alone and with an experiment), launchers run, wandb/optuna configs are valid.

The CLI tests run real (tiny) multiruns through ``train.py``: the basic launcher with wandb offline, a
broken job, the joblib launcher and submitit's local launcher; slow ones cover Optuna, DDP through
submitit tasks and a submitit requeue that resumes from a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CONF, ROOT, TINY
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from wandb_run_file import RunFile

from xnorpp.engine.memory import JEMALLOC_DIRS
from xnorpp.report import ERROR_LOG, collect_runs, summarise
from xnorpp.report.cli import main as report_main

SWEEP = ROOT / "sweep"
EXPERIMENT = ["experiment=seed_resnet18_imagenet", "data.root=/data/imagenet"]
# Tiny CLI runs: TINY without checkpoints (saves ~90 MB of writes per job); logger set per test.
FAST = [*(o for o in TINY if not o.startswith("logger")), "trainer.checkpoint.save=false"]

# preset -> (task_name, hydra.sweeper.params, number of jobs)
PRESETS: dict[str, tuple[str, dict[str, str], int]] = {
    "binarization": ("sweep_binarization", {"binarization": "fp,weight_only,full_binary,real_downsample",
                                            "seed": "0,1,2"}, 12),
    "scale": ("sweep_scale", {"binarization": "full_binary",
                              "scale": "none,xnor,channel,full,channel_spatial,rank1", "seed": "0,1,2"}, 18),
    "recipe": ("sweep_recipe", {"+sweep/recipes": "sgd_cosine_restarts,adam_step,adamw_cosine",
                                "seed": "0,1,2"}, 9),
    "downsample": ("sweep_downsample", {"binarization": "real_downsample,full_binary", "seed": "0,1,2"}, 6),
    "methods": ("sweep_methods", {"+sweep/methods": "xnornet,xnorpp,bireal,reactnet", "seed": "0,1,2"}, 12),
}  # fmt: skip
# method -> (block, binarization, scale, estimator)
METHODS = {"xnornet": ("preact", "full_binary", "xnor", "ste"), "xnorpp": ("preact", "real_downsample", "rank1", "ste"),
           "bireal": ("bireal", "real_downsample", "magnitude_aware", "approx_sign"),
           "reactnet": ("reactnet", "real_downsample", "magnitude_aware", "approx_sign")}  # fmt: skip
RECIPES = {"sgd_cosine_restarts": ("sgd", "cosine_restarts", 0.1), "adam_step": ("adam", "step", 1e-3),
           "adamw_cosine": ("adamw", "cosine", 1e-3)}  # fmt: skip


def _compose(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def _jobs(params: dict[str, str]) -> list[list[str]]:
    """The job overrides Hydra's basic sweeper makes from ``params`` (cartesian product)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return BasicSweeper.split_arguments(parsed, None)[0]


def _train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _results(job: Path) -> dict[str, Any]:
    return json.loads((job / "results.json").read_text())


# ------------------------------------------------------------------------------------------------ presets
def test_every_preset_is_tested() -> None:
    assert {p.stem for p in SWEEP.glob("*.yaml")} == {*PRESETS, "optuna_lr_wd"}
    assert {p.stem for p in (SWEEP / "recipes").glob("*.yaml")} == set(RECIPES)
    assert {p.stem for p in (SWEEP / "methods").glob("*.yaml")} == set(METHODS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_with_its_params(preset: str) -> None:
    task_name, params, n_jobs = PRESETS[preset]
    for extra in ([], EXPERIMENT):
        cfg = _compose(*extra, f"+sweep={preset}")
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.task_name == task_name
        assert OmegaConf.to_container(cfg.hydra.sweeper.params) == params
        assert cfg.hydra.callbacks.record_failure._target_ == "xnorpp.report.RecordFailure"
        assert cfg.hydra.runtime.choices.experiment == ("seed_resnet18_imagenet" if extra else None)
    jobs = _jobs(params)
    assert len(jobs) == n_jobs
    for job in (j for j in jobs if "seed=0" in j):  # every configuration composes with the experiment
        cfg = _compose(*EXPERIMENT, f"+sweep={preset}", *job)
        assert cfg.trainer.epochs == 63 and cfg.data.name == "imagenet"
        for item in job:
            key, _, value = item.lstrip("+").partition("=")
            assert str(cfg.hydra.runtime.choices.get(key, OmegaConf.select(cfg, key))) == value


def test_command_line_values_win_over_preset_params() -> None:
    cfg = _compose("+sweep=scale", "binarization=real_downsample", "seed=0")
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    jobs = _jobs({**params, "binarization": "real_downsample", "seed": "0"})  # what the sweeper does
    assert len(jobs) == 6 and all("binarization=real_downsample" in j and "seed=0" in j for j in jobs)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_sets_the_optimizer_scheduler_pair(recipe: str) -> None:
    optimizer, scheduler, lr = RECIPES[recipe]
    for extra in ([], EXPERIMENT, ["experiment=xnornet_resnet18_imagenet", "data.root=/d"]):
        cfg = _compose(*extra, "+sweep=recipe", f"+sweep/recipes={recipe}")
        assert (cfg.optimizer.name, cfg.scheduler.name, cfg.optimizer.lr) == (optimizer, scheduler, lr), extra
    assert _compose("+sweep=recipe", f"+sweep/recipes={recipe}", "optimizer.lr=0.5").optimizer.lr == 0.5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_sets_block_binarization_scale_and_estimator_only(method: str) -> None:
    for extra in ([], EXPERIMENT):
        cfg = _compose(*extra, "+sweep=methods", f"+sweep/methods={method}")
        got = (cfg.model.block, cfg.binarization.name, cfg.scale.name, cfg.model.estimator)
        assert got == METHODS[method] and cfg.model.name == "resnet18_preact_bin", extra
        assert cfg.data.name == ("imagenet" if extra else "mnist5k")  # the run's data, optimizer, epochs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # optuna 2.10 on SQLAlchemy 2
def test_optuna_preset_composes() -> None:
    cfg = _compose(*EXPERIMENT, "+sweep=optuna_lr_wd")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_.endswith("TPESampler")
    assert sweeper.direction == "maximize" and cfg.task_name == "sweep_optuna_lr_wd"
    assert dict(sweeper.params) == {"optimizer.lr": "tag(log, interval(1e-4, 1))",
                                    "optimizer.weight_decay": "tag(log, interval(1e-6, 1e-2))"}  # fmt: skip
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import LogUniformDistribution

    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed and space["optimizer.lr"] == LogUniformDistribution(1e-4, 1.0)


# ---------------------------------------------------------------------------------------------- launchers
def test_local_parallel_launcher_config() -> None:
    launcher = _compose("hydra/launcher=local_parallel").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert (launcher.n_jobs, launcher.backend) == (2, "loky")


def test_slurm_launcher_config_and_ddp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _compose("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.nodes == 1 and launcher.max_num_timeout > 0
    # CPU-only nodes: one task per node unless told otherwise
    for gpus, tasks, want in (("0", None, 1), ("null", None, 1), ("0", "3", 3), ("2", "1", 1)):
        extra = [f"hydra.launcher.tasks_per_node={tasks}"] if tasks else []
        cpu = _compose("hydra/launcher=slurm", f"hydra.launcher.gpus_per_node={gpus}", *extra).hydra.launcher
        assert cpu.tasks_per_node == want, (gpus, tasks)
    assert any("MASTER_ADDR" in line for line in launcher.setup)
    # the job script preloads jemalloc (trainer.malloc=auto) where the node has it, unless opted out
    line = next(line for line in launcher.setup if "LD_PRELOAD" in line)
    assert all(d in line for d in JEMALLOC_DIRS)  # where find_jemalloc looks
    lib = next((f"{d}/libjemalloc.so.2" for d in JEMALLOC_DIRS if Path(d, "libjemalloc.so.2").exists()), "")
    other = "/x/libtcmalloc.so"
    for env_set, want in (({}, lib), ({"XNORPP_JEMALLOC": "0"}, ""), ({"XNORPP_JEMALLOC": "off"}, ""),
                          ({"LD_PRELOAD": other}, other), ({"LD_PRELOAD": "/x/libfoo.so"}, f"{lib}:/x/libfoo.so")):  # fmt: skip
        env = {"PATH": os.environ["PATH"], **env_set}
        out = subprocess.run(
            ["bash", "-c", f'{line}\necho "$LD_PRELOAD"'], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0 and out.stdout.strip() == want.strip(":"), (env_set, out)
    for key, value in {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}.items():
        monkeypatch.setenv(key, value)
    assert dict(cfg.hydra.job.env_set) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}


def test_slurm_launcher_renders_an_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our config through the plugin's own parameter mapping into submitit's sbatch file (no cluster)."""
    import submitit
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("srun", "sbatch"):
        (fake_bin / tool).write_text("#!/bin/sh\nexit 1\n")
        (fake_bin / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    rendered: dict[str, str] = {}

    class Stop(Exception):
        pass

    class Recorder(submitit.AutoExecutor):
        def map_array(self, fn: Any, *iterable: Any) -> Any:
            rendered["sbatch"] = self._executor._make_submission_file_text(
                "python -m submitit.core._submit", "u"
            )
            raise Stop

    monkeypatch.setattr(submitit, "AutoExecutor", Recorder)
    for gpus, flags in (("2", ["--gpus-per-node=2", "--ntasks-per-node=2", "--partition=gpu"]),
                        ("0", ["--gpus-per-node=0", "--ntasks-per-node=1"])):  # fmt: skip
        cfg = _compose("hydra/launcher=slurm", f"hydra.launcher.gpus_per_node={gpus}", "hydra.launcher.partition=gpu",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
        launcher = instantiate(cfg.hydra.launcher)
        launcher.config = cfg
        with pytest.raises(Stop):
            launcher.launch([["seed=0"]], initial_job_idx=0)
        text = rendered["sbatch"]
        for flag in [*flags, "--signal=USR2@300", "--nodes=1", "--cpus-per-task=8", "--mem=16GB"]:
            assert f"#SBATCH {flag}" in text, (flag, text)
        assert "export MASTER_ADDR=" in text and "export MASTER_PORT=" in text
        assert "export SLURM_KILL_BAD_EXIT=1" in text  # a failed task ends the others


# -------------------------------------------------------------------------------------------- wandb sweeps
def _wandb_sample(param: dict[str, Any]) -> Any:
    if "value" in param:
        return param["value"]
    if "values" in param:
        return param["values"][-1]
    return param["min"]


@pytest.mark.parametrize("name", ["binarization", "lr_wd"])
def test_wandb_sweep_file_makes_valid_overrides(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load((SWEEP / "wandb" / f"{name}.yaml").read_text())
    assert spec["program"] == "train.py" and (ROOT / spec["program"]).is_file()
    assert spec["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    assert spec["metric"] == {"name": "best/val/top1", "goal": "maximize"}
    assert spec["method"] in ("grid", "random", "bayes")
    # What the agent passes to train.py for one sample of the parameters, as wandb builds it.
    args = {k: {"value": _wandb_sample(v)} for k, v in spec["parameters"].items()}
    overrides = create_sweep_command_args({"args": args})["args_no_hyphens"]
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "run1")
    cfg = _compose(*overrides)
    assert cfg.hydra.run.dir == "outputs/wandb_sweep/sw1/run1"
    assert cfg.logger.wandb.mode == "online"
    for key, arg in args.items():
        if not key.startswith("hydra."):
            value = cfg.hydra.runtime.choices.get(key, OmegaConf.select(cfg, key))
            assert value == arg["value"] or (
                key in cfg.hydra.runtime.choices and str(value) == str(arg["value"])
            )


# --------------------------------------------------------------------------------------------- CLI runs
def test_cli_multirun_logs_one_wandb_group_per_configuration_and_reports(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "mr"
    out = _train("-m", "binarization=fp,full_binary", "seed=0,1", *FAST, "logger=wandb", "logger.wandb.mode=offline",
                 "logger.wandb.log_model_summary=false", f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    runs = {}
    for job in jobs:
        assert _results(job)["epochs"] == 1
        (run_file,) = RunFile.of_run_dir(job)
        assert run_file.exit_codes == [0], "the run was not finished"
        runs[run_file.run.display_name] = run_file.run
    assert set(runs) == {"fp-s0", "fp-s1", "full_binary-rank1-s0", "full_binary-rank1-s1"}  # fp has no scale
    # one wandb group per configuration: the seeds of a configuration share it (wandb averages them)
    assert runs["fp-s0"].run_group == runs["fp-s1"].run_group != runs["full_binary-rank1-s0"].run_group
    assert runs["full_binary-rank1-s0"].run_group == runs["full_binary-rank1-s1"].run_group
    fp_group, fb_group = runs["fp-s0"].run_group, runs["full_binary-rank1-s0"].run_group
    assert fp_group.startswith("train/fp data.") and fb_group.startswith("train/full_binary-rank1 data.")
    assert len(fp_group) <= 128 and "seed" not in fp_group and "trainer.kernels" not in fp_group
    fp_tags = set(runs["fp-s0"].tags)
    assert {"binarization:fp", f"launch:{sweep_dir.name}"} <= fp_tags
    assert not any(t.startswith("scale:") for t in fp_tags)  # tags only name choices that apply
    assert "scale:rank1" in runs["full_binary-rank1-s0"].tags

    assert report_main([str(sweep_dir)]) == 0
    rows = summarise(collect_runs([sweep_dir]))
    assert sorted(r.config["binarization"] for r in rows) == ["fp", "full_binary"]
    table = (sweep_dir / "report.md").read_text()
    assert "| fp |" in table and "| full_binary |" in table and "Failed runs" not in table
    assert (sweep_dir / "report.png").stat().st_size > 1000


@pytest.mark.slow  # a failed job in a report is covered by test_dashboard; joblib by the image-folder job test
def test_joblib_runs_two_jobs_and_a_broken_one_is_reported(tmp_path: Path) -> None:
    """A preset (no -m: it sets MULTIRUN) on the joblib launcher, two jobs side by side; one is broken:
    data.image_size=2 is too small for the rank1 scale and fails before training."""
    sweep_dir = tmp_path / "joblib"
    out = _train("+sweep=downsample", "hydra/launcher=local_parallel", "binarization=real_downsample", "seed=0",
                 *FAST, "data.image_size=2,16", "logger=none", f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in out.stdout + out.stderr
    # Every job runs; the sweeper then re-raises the first failure: exit status 1.
    assert out.returncode == 1 and "too small for scale=rank1" in out.stderr
    failed, good = sweep_dir / "0", sweep_dir / "1"
    assert not (failed / "results.json").exists() and _results(good)["epochs"] == 1
    assert "ValueError: data.image_size=2 is too small" in (failed / ERROR_LOG).read_text()  # from the worker

    assert report_main([str(sweep_dir)]) == 0
    text = (sweep_dir / "report.md").read_text()
    assert "## Failed runs (1)" in text and "data.image_size=2" in text and "is too small" in text
    assert "1 finished runs in 1 configurations, 1 failed" in text


def test_submitit_local_launcher_runs_a_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "submitit"
    out = _train("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "binarization=fp",
                 *FAST, "logger=none", f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert _results(sweep_dir / "0")["model_args"]["binarization"] == "fp"
    logs = list((sweep_dir / ".submitit").glob("*/*_0_log.out"))
    assert (
        logs
        and "Exiting after successful completion"
        in logs[0].read_text() + logs[0].with_suffix(".err").read_text()
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_optuna_runs_two_trials(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    out = _train("+sweep=optuna_lr_wd", "hydra.sweeper.n_trials=2", *FAST, "logger=none",
                 f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and 0 <= best["best_value"] <= 100
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay"}
    trials = [_results(sweep_dir / j) for j in ("0", "1")]
    assert max(t["best/val/top1"] for t in trials) == best["best_value"]
    rows = summarise(collect_runs([sweep_dir]))
    assert len(rows) == 2  # every trial is its own configuration (its own lr, weight decay)


@pytest.mark.slow
def test_submitit_tasks_run_ddp_with_env_set(tmp_path: Path) -> None:
    """tasks_per_node=2 plus hydra.job.env_set (the local analogue of slurm.yaml's) makes a 2-process DDP run."""
    sweep_dir = tmp_path / "ddp"
    env_set = ("++hydra.job.env_set={RANK:${oc.env:SUBMITIT_LOCAL_GLOBALID,0},"
               "LOCAL_RANK:${oc.env:SUBMITIT_LOCAL_LOCALID,0},WORLD_SIZE:${oc.env:SUBMITIT_LOCAL_NTASKS,1},"
               "MASTER_ADDR:127.0.0.1,MASTER_PORT:29517}")  # fmt: skip
    out = _train("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                 "hydra.launcher.tasks_per_node=2", env_set, *FAST, "logger=none", f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert _results(sweep_dir / "0")["world_size"] == 2


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_submitit_requeue_resumes_from_the_newest_checkpoint(tmp_path: Path) -> None:
    """submitit's USR2 (sent by SLURM before the time limit) requeues the job; the rerun resumes."""
    sweep_dir = tmp_path / "requeue"
    args = [*(o for o in TINY if o not in ("trainer.epochs=1", "trainer.limit_train_batches=2")), "trainer.epochs=2",
            "trainer.limit_train_batches=6", "trainer.checkpoint.every_steps=2", "data.num_samples=128"]  # fmt: skip
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           *args, f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 240
        while not list((sweep_dir / "0" / "checkpoints").glob("step_*.pt")):
            assert proc.poll() is None and time.time() < deadline, "no step checkpoint appeared"
            time.sleep(0.05)
        (controller,) = [int(p.name) for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
        (task,) = _children(controller)
        os.kill(task, signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    log = (sweep_dir / "0" / "train.log").read_text()
    assert "Requeued job" in log and "resumed from" in log
    results = _results(sweep_dir / "0")
    assert results["epochs"] == 2 and results["global_step"] == 12


def test_joblib_jobs_read_an_image_folder_with_worker_processes(tmp_path: Path) -> None:
    """DataLoader workers inside joblib's loky workers (whose start method DataLoader cannot use)."""
    from PIL import Image

    for k in range(2):
        (tmp_path / "imgs" / f"c{k}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (20, 24), (40 + 150 * k, 9 * i, 60)).save(
                tmp_path / "imgs" / f"c{k}" / f"{i}.png"
            )
    sweep_dir = tmp_path / "folder"
    out = _train("-m", "hydra/launcher=local_parallel", "data=imagefolder", f"data.root={tmp_path / 'imgs'}",
                 "data.image_size=32", "data.num_workers=2", "data.batch_size=4", "data.val_fraction=0.25",
                 "binarization=fp,full_binary", "trainer.epochs=1", "trainer.kernels=eager", "logger=none",
                 f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert [_results(sweep_dir / j)["global_step"] for j in ("0", "1")] == [3, 3]
