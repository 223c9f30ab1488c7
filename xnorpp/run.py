"""The task: build everything from the composed config, fit, evaluate, write results, return the metric.

This is the only module below ``train.py`` that knows about Hydra/OmegaConf; the builders it calls
take plain values.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import models as _models  # noqa: F401  (registers the binary ResNets with timm)
from .data import DATASETS, build_datasets
from .engine import StepState, build_optimizer, build_scheduler, evaluate, lr_factor, train_one_epoch
from .engine.checkpoint import (
    CheckpointError,
    capture_rng,
    find_resumable,
    load_checkpoint,
    restore_rng,
    rotate,
    save_checkpoint,
)
from .engine.distill import Distiller, load_teacher
from .engine.distributed import DistInfo, barrier, init_distributed, peer_failed
from .engine.health import BinarizationHealth
from .engine.loaders import build_loaders
from .engine.loop import PRECISIONS
from .engine.memory import allocator, malloc_in_use, set_malloc_policy
from .engine.preemption import REQUEUE_EXIT_CODE, Attempts, Preempted, Preemption
from .export import build_model_from_args, is_binary_architecture
from .model_summary import summary
from .models import BINARIZATIONS
from .nn import SCALES, SPATIAL_SCALES
from .nn.fused import has_fused, warm_up_fused
from .nn.int8_conv import int8_conv_calls, set_int8_conv
from .nn.kernels import get_kernels, set_kernels
from .nn.native import calls as native_calls
from .stages import init_weights, run_stages
from .track import WandbTracker, write_results
from .track.naming import run_group, run_name, run_tags
from .track.wandb_tracker import epoch_row_for_wandb

log = logging.getLogger("xnorpp")

__all__ = ["MODEL_KEYS", "REQUEUE_EXIT_CODE", "Preempted", "build_model", "model_args_from_cfg", "train"]

MODEL_KEYS = ("name", "binarization", "scale", "num_classes", "in_chans", "input_size", "stem", "estimator",
              "block", "centre_weights", "binarize")  # fmt: skip
_DEFAULT_THREADS = torch.get_num_threads()  # this process's own, for the jobs of a multirun that set none


# --------------------------------------------------------------------------------------------------- model
def model_args_from_cfg(cfg: DictConfig, num_classes: int, in_chans: int) -> dict[str, Any]:
    """The plain ``timm.create_model`` arguments a config describes (stored in every checkpoint); a block
    other than ``preact`` (``model.block``), the ``model.binarize`` policy of ``model=timm`` and, for
    ``optimizer=bop``, ``centre_weights: False`` only when they apply."""
    if cfg.binarization.name not in BINARIZATIONS:
        raise ValueError(
            f"unknown binarization {cfg.binarization.name!r}; valid choices: {', '.join(BINARIZATIONS)}"
        )
    if cfg.scale.name not in SCALES:
        raise ValueError(f"unknown scale {cfg.scale.name!r}; valid choices: {', '.join(SCALES)}")
    return {
        "name": str(cfg.model.name),
        "binarization": str(cfg.binarization.name),
        "scale": str(cfg.scale.name),
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "input_size": int(cfg.data.image_size),
        "stem": str(cfg.model.stem),
        "estimator": str(cfg.model.estimator),
        **({"block": str(cfg.model.block)} if cfg.model.get("block", "preact") != "preact" else {}),
        **({"centre_weights": False} if cfg.optimizer.name == "bop" else {}),
        **({"binarize": OmegaConf.to_container(cfg.model.binarize, resolve=True)} if cfg.model.get("binarize") is not None
           else {}),
    }  # fmt: skip


def build_model(model_args: dict[str, Any]) -> torch.nn.Module:
    """``timm.create_model`` from stored arguments; timm's own real models ignore the binary ones."""
    binarizable = is_binary_architecture(model_args["name"]) or "binarize" in model_args
    if not binarizable and model_args["binarization"] != "fp":
        log.warning(
            "model %s is real-valued: binarization=%s and scale are ignored",
            model_args["name"], model_args["binarization"],
        )  # fmt: skip
    return build_model_from_args(model_args)


def _apply_process_settings(cfg: DictConfig, device: torch.device, primary: bool) -> None:
    """Set every process-wide switch from this job's config, so that a job of a multirun starts from its
    own settings, not the last job's: ``trainer.kernels`` (a failed compile of an earlier job is tried
    again), ``trainer.int8_conv``, torch threads, ``trainer.deterministic`` and, on CPU,
    ``trainer.malloc`` (before the big allocations: the policy applies to memory mapped later). A wrong
    value names the key and the valid choices."""
    int8 = cfg.trainer.int8_conv
    if not isinstance(int8, bool):
        raise ValueError(f"trainer.int8_conv must be true or false, got {int8!r}")
    set_int8_conv(int8)
    for key, apply in (("kernels", set_kernels), ("malloc", set_malloc_policy)):
        if key == "malloc" and device.type != "cpu":
            continue
        try:
            apply(str(cfg.trainer[key]))
        except ValueError as e:
            raise ValueError(f"trainer.{key}: {e}") from None
    threads, source = _cpu_threads(cfg)
    torch.set_num_threads(threads)
    if primary:
        log.info("torch threads: %d (%s)", threads, source)
    deterministic = bool(cfg.trainer.deterministic)
    torch.use_deterministic_algorithms(deterministic)
    # fixed input shapes: let cuDNN pick the fastest algorithms once
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def _check_scale_fits(model_args: dict[str, Any]) -> None:
    """Spatial scales only make sense when the stages keep a spatial extent: say so before training."""
    binary = is_binary_architecture(model_args["name"]) and model_args["binarization"] != "fp"
    if model_args["scale"] not in SPATIAL_SCALES or not binary:
        return
    min_size = 32 if model_args["stem"] == "imagenet" else 8
    if model_args["input_size"] < min_size:
        raise ValueError(
            f"data.image_size={model_args['input_size']} is too small for scale={model_args['scale']} with "
            f"stem={model_args['stem']}: below {min_size} px every stage after the first is 1x1, where a spatial Gamma is just a per-channel one; use image_size >= {min_size} or scale=channel"
        )


def _scale_learning_rates(opt_cfg: dict[str, Any], sched_cfg: dict[str, Any], global_batch: int) -> float:
    """Scale ``optimizer.lr`` (and the schedule's ``min_lr``/``warmup_lr``), given for a global batch of
    ``optimizer.lr_base_size``, to this run's global batch by ``optimizer.lr_base_scale``; in place.
    Returns the factor (1: the rates as given)."""
    base, rule = opt_cfg.pop("lr_base_size", None), str(opt_cfg.pop("lr_base_scale", "linear"))
    factor = lr_factor(global_batch, base, rule)
    if factor != 1.0:
        log.info(
            "optimizer.lr %g is for a global batch of %s; %s scaling gives %g for this run's %d "
            "(optimizer.lr_base_size=null uses it as given)", opt_cfg["lr"], base, rule, opt_cfg["lr"] * factor,
            global_batch,
        )  # fmt: skip
    opt_cfg["lr"] = float(opt_cfg["lr"]) * factor
    for key in ("min_lr", "warmup_lr"):
        if key in sched_cfg:
            sched_cfg[key] = float(sched_cfg[key]) * factor
    return factor


# ---------------------------------------------------------------------------------------------- set-up
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _hydra_choices() -> tuple[dict[str, str], list[str], str | None]:
    """Group choices, command-line overrides and sweep directory of the current Hydra job, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}, [], None
        hc = HydraConfig.get()
        choices = {
            k: str(v) for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra/")
        }
        sweep_dir = str(hc.sweep.dir) if str(hc.mode) == "RunMode.MULTIRUN" else None
        return choices, list(hc.overrides.task), sweep_dir
    except Exception:  # compose API without hydra config, or Hydra internals changed
        return {}, [], None


def _cpu_threads(cfg: DictConfig) -> tuple[int, str]:
    """Torch threads for this job and where the number comes from: ``trainer.threads``, the SLURM
    allocation (``SLURM_CPUS_PER_TASK``, shared by torchrun's processes if it runs in one task), the joblib
    launcher's share of the cores, else this process's default (``OMP_NUM_THREADS`` or the cores)."""
    if cfg.trainer.threads:
        return int(cfg.trainer.threads), "trainer.threads"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
        return max(1, int(slurm) // local), f"SLURM_CPUS_PER_TASK={slurm}" + (
            f" / {local} processes" if local > 1 else ""
        )
    share = _launcher_threads()
    if share:
        return share, "the joblib launcher's share of the cores"
    return _DEFAULT_THREADS, "the process's default"


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


# --------------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training (or evaluation, ``train=false``) job and return its results dict; a config with
    ``stages`` runs them one after the other (:mod:`xnorpp.stages`)."""
    if cfg.get("stages") and cfg.train:
        return run_stages(cfg)
    start_time = time.time()
    out_dir = Path(cfg.output_dir)
    dist_info, device = init_distributed(str(cfg.trainer.device))
    primary = dist_info.primary
    _apply_process_settings(cfg, device, primary)
    _seed_everything(int(cfg.seed))

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data_cfg, dict)
    name = data_cfg.pop("name")
    if name not in DATASETS:
        raise ValueError(f"unknown data {name!r}; valid choices: {', '.join(DATASETS)}")
    loader_keys = ("batch_size", "eval_batch_size", "num_workers", "stem")
    loader_cfg = {k: data_cfg.pop(k, None) for k in loader_keys}
    model_args_preview = model_args_from_cfg(cfg, 10, 1)  # validates names before touching data
    _check_scale_fits(model_args_preview)
    try:
        train_ds, val_ds, info = build_datasets(name, **data_cfg)
    except (FileNotFoundError, ValueError) as e:
        if name in ("imagefolder", "imagenet"):
            raise type(e)(f"{e} (data.root={cfg.data.root})") from e
        raise
    model_args = model_args_from_cfg(cfg, info.num_classes, info.in_chans)

    model = build_model(model_args)
    binarization_map = getattr(model, "binarization_map", None)
    if binarization_map is not None and primary:
        log.info("binarization map of %s:\n%s", model_args["name"], binarization_map.table())
    init_from = str(cfg.init_from) if cfg.get("init_from") and cfg.train else None
    if init_from:  # weights only; a checkpoint of this run, if any, replaces them below
        init_weights(model, init_from)
    model_summary = summary(model, model_args["input_size"], model_args["in_chans"])
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cpu" and not cfg.trainer.compile and has_fused(model):
        # compile the sign kernels now: no compile in the first step, no compiler memory amid activations
        warm_up_fused(device, PRECISIONS.get(str(cfg.trainer.precision)))

    train_loader, val_loader, sampler = build_loaders(
        train_ds, val_ds, batch_size=int(loader_cfg["batch_size"]), num_workers=int(loader_cfg["num_workers"] or 0),
        seed=int(cfg.seed), rank=dist_info.rank, world_size=dist_info.world_size, pin_memory=device.type == "cuda",
        eval_batch_size=loader_cfg["eval_batch_size"],
    )  # fmt: skip
    if len(train_loader) == 0:
        raise ValueError(
            f"the training set has {len(train_ds)} images, fewer than one batch of data.batch_size="
            f"{loader_cfg['batch_size']} per process: lower data.batch_size"
        )
    distiller = _build_distiller(cfg, info.num_classes, info.in_chans, device) if cfg.train else None
    opt_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
    assert isinstance(opt_cfg, dict) and isinstance(sched_cfg, dict)
    lr_scale = _scale_learning_rates(opt_cfg, sched_cfg, int(loader_cfg["batch_size"]) * dist_info.world_size)
    optimizer = build_optimizer(model, **opt_cfg)
    epochs = int(cfg.trainer.epochs)
    limit = cfg.trainer.limit_train_batches
    updates_per_epoch = min(len(train_loader), int(limit)) if limit else len(train_loader)
    scheduler = build_scheduler(optimizer, epochs=epochs, updates_per_epoch=updates_per_epoch, **sched_cfg)
    precision = str(cfg.trainer.precision)
    if precision != "32" and device.type == "cpu":
        log.warning("trainer.precision=%s on CPU: autocast on CPU is far slower than fp32 here", precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "16" else None

    # ------------------------------------------------------------------------------------ resume
    state = StepState()
    best: dict[str, float] = {"best/val/top1": -1.0, "best/val/top5": -1.0, "best/epoch": -1}
    history: list[dict[str, float]] = []
    wandb_id: str | None = None
    attempts = Attempts(start=start_time)
    ckpt_dir = out_dir / "checkpoints"
    resume_from: tuple[Path, dict[str, Any]] | None = None
    if cfg.ckpt_path:
        resume_from = (Path(cfg.ckpt_path), load_checkpoint(cfg.ckpt_path))
    elif cfg.train:
        resume_from = find_resumable(ckpt_dir)
    if resume_from is not None:
        path, ckpt = resume_from
        _check_compatible(ckpt, model_args, path)
        model.load_state_dict(ckpt["model"])
        if cfg.train:
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
            state = StepState.from_dict(ckpt["state"], primary=primary)
            attempts = Attempts.resumed(ckpt.get("attempts"), start_time)
            best = dict(ckpt.get("best", best))
            history = list(ckpt.get("history", []))
            wandb_id = ckpt.get("wandb_id")
            restore_rng(ckpt["rng"])
            log.info("resumed from %s (epoch %d, step %d)", path, state.epoch, state.global_step)

    ddp_model: torch.nn.Module = model
    if dist_info.enabled:
        if cfg.trainer.sync_batchnorm and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif cfg.trainer.sync_batchnorm:
            log.warning(
                "trainer.sync_batchnorm needs CUDA (torch's SyncBatchNorm); BatchNorm stays per process"
            )
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run_model = torch.compile(ddp_model) if cfg.trainer.compile else ddp_model

    # ------------------------------------------------------------------------------------ tracking
    choices, overrides, sweep_dir = _hydra_choices()
    wcfg = cfg.logger.wandb
    job_type = wcfg.job_type or ("train" if cfg.train else "eval")
    binarization, scale = model_args["binarization"], model_args["scale"]
    launch = Path(sweep_dir or out_dir).name
    tag_choices = choices or {"binarization": binarization, "scale": scale, "data": name}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    tracker = WandbTracker(
        enabled=primary, mode=str(wcfg.mode), project=str(wcfg.project), entity=wcfg.entity,
        group=wcfg.group or run_group(str(cfg.task_name), binarization, scale, overrides),
        name=wcfg.name or run_name(binarization, scale, int(cfg.seed)), tags=run_tags(tag_choices, launch, cfg.tags),
        job_type=job_type, notes=wcfg.notes, dir=out_dir, run_id=wandb_id, init_timeout=float(wcfg.init_timeout),
        config={**resolved, "choices": choices, "overrides": overrides, "launch": launch, "model_args": model_args,
                "data_augment": info.augment, "model_summary": model_summary.to_dict(),
                "world_size": dist_info.world_size},
    )  # fmt: skip
    exit_code = 1
    try:
        tracker.define_metrics()
        if history:  # resumed: what the interrupted process logged may never have reached its wandb file
            tracker.log_history(history)
        if primary:
            log.info("run directory: %s", out_dir.resolve())
            log.info("model %s\n%s", model_args, model_summary.table())
        if wcfg.log_model_summary and state.global_step == 0:
            tracker.log_table("model/summary", model_summary.rows())
        results = _fit_or_eval(
            cfg, run_model, model, train_loader, val_loader, sampler, optimizer, scheduler, scaler, state, best,
            history, device, tracker, ckpt_dir, model_args, dist_info, epochs, attempts, distiller,
        )  # fmt: skip
        results.update(
            {
                "params/binary": model_summary.params_binary,
                "params/real": model_summary.params_real,
                "params/total": model_summary.params_total,
                "model/memory_mb": model_summary.memory_bytes / 2**20,
                "model/compression": model_summary.compression,
                "model/ops": model_summary.ops,
                "model_args": model_args,
                "choices": choices,
                "overrides": overrides,
                "data_augment": info.augment,
                "lr": optimizer.defaults["lr"],  # optimizer.lr scaled to the global batch
                "lr_scale": lr_scale,
                "run_dir": str(out_dir.resolve()),
                "wandb_dir": tracker.run_dir,
                "wandb_mode": tracker.status,
                **attempts.to_dict(),  # wall_time_s over every attempt, attempts, requeues
                "world_size": dist_info.world_size,
                "init_from": init_from,
                **({"distill": _distill_record(cfg, distiller, val_loader, device)} if distiller else {}),
                **({"binarization_map": binarization_map.rows()} if binarization_map is not None else {}),
            }
        )
        if primary:
            write_results(out_dir / "results.json", results)
            tracker.summary(_headline(results))
            log.info(
                "done: val top-1 %.2f%% (best %.2f%% at epoch %d), %.0f s; results in %s",
                results.get("val/top1", float("nan")), results.get("best/val/top1", float("nan")),
                results.get("best/epoch", -1), results["wall_time_s"], out_dir / "results.json",
            )  # fmt: skip
            if tracker.run_dir and tracker.status == "offline":
                log.info(
                    "wandb offline run: %s (upload with `wandb sync %s`)", tracker.run_dir, tracker.run_dir
                )
        exit_code = 0
        return results
    except RuntimeError as e:  # gloo reports a rank that has gone as a RuntimeError
        if dist_info.enabled and (isinstance(e, torch.distributed.DistError) or "gloo" in str(e)):
            raise peer_failed(dist_info.rank, e) from e
        raise
    finally:
        files = [
            *sorted((out_dir / ".hydra").glob("*.yaml")),
            out_dir / "results.json",
            out_dir / "train.log",
        ]
        tracker.save_files(files, out_dir)
        tracker.finish(exit_code)
        if exit_code == 0:  # after an error another rank may never get here
            barrier()


FINAL_KEYS = ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1")


def _headline(results: dict[str, Any]) -> dict[str, Any]:
    """The run summary (the runs table): ``best/*`` as the headline, final values as ``final/*`` (the
    ``val/*`` summaries stay their best over epochs), counts, speed and sizes."""
    out = {
        k: v
        for k, v in results.items()
        if isinstance(v, (int, float)) and not k.startswith(("val/", "train/"))
    }
    out.update({f"final/{k}": results[k] for k in FINAL_KEYS if results.get(k) is not None})
    return out


def _build_distiller(
    cfg: DictConfig, num_classes: int, in_chans: int, device: torch.device
) -> Distiller | None:
    """The ``distill`` group's loss with its teacher on ``device``, or None for ``distill=none``."""
    d = cfg.get("distill")
    if d is None or d.name == "none":
        return None
    teacher = load_teacher(str(d.teacher), num_classes, in_chans, d.get("teacher_file"))
    return Distiller(
        str(d.name), teacher.to(device), float(d.get("temperature", 1.0)), float(d.get("weight", 1.0))
    )


def _distill_record(
    cfg: DictConfig, distiller: Distiller, val_loader: Any, device: torch.device
) -> dict[str, Any]:
    """What results.json says of the distillation: its settings and the teacher's own val top-1."""
    tcfg = cfg.trainer
    limit = int(tcfg.limit_val_batches) if tcfg.limit_val_batches else None
    teacher = evaluate(distiller.teacher, val_loader, device=device, precision=str(tcfg.precision),
                       channels_last=bool(tcfg.channels_last), max_steps=limit)  # fmt: skip
    return {**OmegaConf.to_container(cfg.distill, resolve=True), "teacher_val_top1": teacher["val/top1"]}  # type: ignore[dict-item]


def _check_compatible(ckpt: dict[str, Any], model_args: dict[str, Any], path: Path) -> None:
    stored = ckpt.get("model_args")
    if stored is None:
        raise CheckpointError(f"checkpoint {path} has no model_args: not written by xnorpp's trainer")
    diff = {k: (stored.get(k), model_args.get(k)) for k in MODEL_KEYS if stored.get(k) != model_args.get(k)}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"checkpoint {path} is for a different model ({desc}); pick the matching config"
        )


def _fit_or_eval(
    cfg: DictConfig,
    run_model: torch.nn.Module,
    model: torch.nn.Module,
    train_loader: Any,
    val_loader: Any,
    sampler: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    state: StepState,
    best: dict[str, float],
    history: list[dict[str, float]],
    device: torch.device,
    tracker: WandbTracker,
    ckpt_dir: Path,
    model_args: dict[str, Any],
    dist_info: DistInfo,
    epochs: int,
    attempts: Attempts,
    distiller: Distiller | None = None,
) -> dict[str, Any]:
    tcfg = cfg.trainer
    int8_calls, c_calls = int8_conv_calls(), native_calls()
    precision = str(tcfg.precision)
    val_limit = int(tcfg.limit_val_batches) if tcfg.limit_val_batches else None
    if not cfg.train:
        metrics = evaluate(run_model, val_loader, device=device, precision=precision,
                           channels_last=bool(tcfg.channels_last), max_steps=val_limit)  # fmt: skip
        tracker.log({**metrics, "epoch": 0})
        return {**metrics, "epochs": 0, "ckpt_path": str(cfg.ckpt_path)}

    limit = int(tcfg.limit_train_batches) if tcfg.limit_train_batches else None
    every = int(tcfg.checkpoint.every_steps) if tcfg.checkpoint.every_steps else None
    save = bool(tcfg.checkpoint.save)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    last_train: dict[str, float] = {}

    def snapshot(totals: StepState, requeue: bool) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            "state": totals.to_dict(),
            "attempts": attempts.to_dict(requeue),
            "best": dict(best),
            "history": list(history),
            "rng": capture_rng(),
            "model_args": model_args,
            "config_yaml": config_yaml,
            "wandb_id": tracker.run_id,
        }  # fmt: skip

    def write(name: str, requeue: bool = False) -> None:
        """Every rank calls it (the epoch's running sums are totalled over ranks); rank 0 writes."""
        if not save:
            return
        totals = state.summed_over_ranks(device)
        if not dist_info.primary:
            return
        try:
            save_checkpoint(snapshot(totals, requeue), ckpt_dir / name)
            if name.startswith("step_"):
                rotate(ckpt_dir, int(tcfg.checkpoint.keep_last))
        except CheckpointError as e:
            log.error("%s", e)

    health_every = int(tcfg.health_every or 0)
    health = BinarizationHealth(model, health_every) if health_every > 0 and tracker.enabled else None

    with Preemption() as preempt:

        def after_step(s: StepState) -> None:
            if every and s.global_step % every == 0:
                write(f"step_{s.global_step:09d}.pt")

        while state.epoch < epochs:
            sampler.set_epoch(state.epoch, state.batch_in_epoch * int(train_loader.batch_size))
            train_loader.dataset.set_epoch(state.epoch)
            last_train = train_one_epoch(
                run_model, train_loader, optimizer, scheduler, state, device=device, epochs=epochs,
                precision=precision, scaler=scaler, channels_last=bool(tcfg.channels_last),
                grad_clip=tcfg.grad_clip, on_nonfinite=str(tcfg.on_nonfinite), log_every=int(tcfg.log_every),
                log_fn=tracker.log if tracker.enabled else None, after_step=after_step, preemption=preempt,
                progress=dist_info.primary, max_steps=limit, health=health, histogram=tracker.histogram,
                loss_fn=distiller,
            )  # fmt: skip
            if preempt.agreed is not None:  # the same step on every rank
                write(f"step_{state.global_step:09d}.pt", requeue=True)
                tracker.log({"preempted": 1, "global_step": state.global_step})
                tracker.finish(REQUEUE_EXIT_CODE, preempted=True)  # before a requeue ends wandb's process
                exit_ = preempt.hand_over()  # submitit: rank 0 requeues the job
                barrier()  # no rank exits while rank 0 still writes or requeues
                raise exit_
            done = state.epoch + 1
            state.epoch, state.batch_in_epoch = done, 0
            epoch_row: dict[str, float] = {"epoch": done, "global_step": state.global_step, **last_train}
            improved = False
            if done % int(tcfg.val_every) == 0 or done == epochs:
                metrics = evaluate(run_model, val_loader, device=device, precision=precision,
                                   channels_last=bool(tcfg.channels_last), max_steps=val_limit)  # fmt: skip
                epoch_row.update(metrics)
                improved = metrics["val/top1"] > best["best/val/top1"]
                if improved:
                    best.update({"best/val/top1": metrics["val/top1"], "best/val/top5": metrics["val/top5"],
                                 "best/epoch": done})  # fmt: skip
                if dist_info.primary:
                    log.info("epoch %d/%d: val top-1 %.2f%% top-5 %.2f%% loss %.4f | train loss %.4f %.0f img/s",
                             done, epochs, metrics["val/top1"], metrics["val/top5"], metrics["val/loss"],
                             last_train["train/loss"], last_train["train/img_per_s"])  # fmt: skip
            history.append(epoch_row)
            tracker.log(epoch_row_for_wandb(epoch_row))
            write("last.pt")
            if improved:
                write("best.pt")

    final = history[-1] if history else {}
    img_per_s = [h["train/img_per_s"] for h in history if "train/img_per_s" in h]
    return {
        "val/top1": final.get("val/top1"),
        "val/top5": final.get("val/top5"),
        "val/loss": final.get("val/loss"),
        "val/images": final.get("val/images"),
        "train/loss": final.get("train/loss"),
        "train/top1": final.get("train/top1"),
        "train/img_per_s": float(np.median(img_per_s)) if img_per_s else None,
        **best,
        "epochs": state.epoch,
        "global_step": state.global_step,
        "skipped_steps": state.skipped_steps,
        "threads": torch.get_num_threads(),
        "history": history,
        "accuracy_unit": "percent",
        "kernels": get_kernels(),  # "eager" if trainer.kernels=compiled could not compile
        # whether binary forward convs ran as exact int8 convs (CPU, fp32, not compiled; xnorpp.nn.int8_conv)
        "int8_conv": int8_conv_calls() > int8_calls,
        # whether the binary layers' element-wise work ran in the C kernels (CPU, kernels=compiled; xnorpp.nn.native)
        "c_kernels": native_calls() > c_calls,
        # the CPU allocator policy applied (auto resolved: jemalloc or keep; None on GPU) and the allocator
        "malloc": malloc_in_use(str(cfg.trainer.malloc)) if device.type == "cpu" else None,
        "allocator": allocator(),
    }
