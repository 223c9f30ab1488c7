"""The story of one run: set up the runtime, build the data, build the components, fit or evaluate, write
the results (:func:`train`).

With :mod:`xnorpp.job`, the only modules below ``train.py`` that know about Hydra/OmegaConf: each step
turns its config group into plain values for a builder of the library (:mod:`xnorpp.data`,
:mod:`xnorpp.engine`, :mod:`xnorpp.track`, :mod:`xnorpp.accel`).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from . import accel
from . import models as _models  # noqa: F401  (registers the binary ResNets with timm)
from .data import DATASETS, DatasetInfo, build_datasets
from .data.pipeline import build_pipeline
from .engine import (
    Callback,
    Checkpointer,
    TrainerOptions,
    TrainState,
    build_optimizer,
    build_scheduler,
    evaluate,
    lr_factor,
)
from .engine.distill import Distiller, load_teacher
from .engine.distributed import DistInfo, barrier, collective_errors, init_distributed
from .engine.loaders import build_loaders
from .engine.loop import PRECISIONS
from .engine.preemption import REQUEUE_EXIT_CODE, Attempts, Preempted
from .engine.trainer import Trainer
from .export import build_model_from_args, is_binary_architecture
from .job import JobInfo, cpu_threads, job_info
from .model_summary import ModelSummary, summary
from .models import BINARIZATIONS
from .nn import SCALES, SPATIAL_SCALES
from .registry import import_modules
from .stages import init_weights, run_stages
from .track import WandbTracker, write_results
from .track.naming import run_group, run_name, run_tags

log = logging.getLogger("xnorpp")

__all__ = ["REQUEUE_EXIT_CODE", "Preempted", "build_model", "model_args_from_cfg", "train"]


# ------------------------------------------------------------------------------------------- the story
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training (or evaluation, ``train=false``) job and return its results dict; a config with
    ``stages`` runs them one after the other, each a run of this function (:mod:`xnorpp.stages`)."""
    if cfg.get("stages") and cfg.train:
        return run_stages(cfg, train)
    started = time.time()
    import_modules(cfg.get("imports") or ())  # the user's registrations: datasets, optimizers, models, ...
    check_model_config(cfg)  # names and sizes, before touching data
    runtime = setup_runtime(cfg)  # processes, device, threads, seeds
    with accel.configure(cfg.trainer, runtime.device) as speed:  # speed switches, restored afterwards
        data = build_data(cfg, runtime)  # datasets and loaders
        parts = build_components(cfg, data, runtime, speed)  # model, optimizer, schedule, loss
        checkpointer = make_checkpointer(cfg, runtime)
        state = resume(cfg, checkpointer, parts, runtime, started)  # where training is
        parts.wrap(cfg.trainer, runtime)  # DDP, SyncBatchNorm, torch.compile
        job = job_info()
        with collective_errors(runtime.dist), make_tracker(cfg, runtime, data, parts, job, state) as tracker:
            trainer = make_trainer(cfg, runtime, data, parts, checkpointer, tracker)
            results = fit_or_evaluate(cfg, trainer, state, tracker)
            results.update(speed.report(), **run_facts(cfg, runtime, data, parts, job, tracker, state))
            write_run_results(cfg, runtime, tracker, results)
    barrier()  # after an error another rank may never get here
    return results


# -------------------------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class Runtime:
    """This process's place in the run: its rank among ``dist.world_size`` and its device."""

    dist: DistInfo
    device: torch.device
    out_dir: Path

    @property
    def primary(self) -> bool:
        return self.dist.primary


def setup_runtime(cfg: DictConfig) -> Runtime:
    """Join the process group (torchrun), pick the device, set the torch threads, determinism and seeds
    from this job's config (so a job of a multirun starts from its own settings, not the last job's)."""
    dist_info, device = init_distributed(str(cfg.trainer.device))
    threads, source = cpu_threads(cfg.trainer.threads)
    torch.set_num_threads(threads)
    if dist_info.primary:
        log.info("torch threads: %d (%s)", threads, source)
    deterministic = bool(cfg.trainer.deterministic)
    torch.use_deterministic_algorithms(deterministic)
    # fixed input shapes: let cuDNN pick the fastest algorithms once
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    seed = int(cfg.seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(dist_info, device, Path(cfg.output_dir))


# ----------------------------------------------------------------------------------------------- model
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
    given = cfg.model.get("kwargs")
    kwargs = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else dict(given or {})
    return {
        "name": str(cfg.model.name),
        "binarization": str(cfg.binarization.name),
        "scale": str(cfg.scale.name),
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "input_size": int(cfg.data.image_size),
        "stem": str(cfg.model.stem),
        "estimator": str(cfg.model.estimator),
        "kwargs": kwargs,
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


def check_model_config(cfg: DictConfig) -> None:
    """Valid names, and spatial scales only where the stages keep a spatial extent: say so before training."""
    model_args = model_args_from_cfg(cfg, 10, 1)
    binary = is_binary_architecture(model_args["name"]) and model_args["binarization"] != "fp"
    if model_args["scale"] not in SPATIAL_SCALES or not binary:
        return
    min_size = 32 if model_args["stem"] == "imagenet" else 8
    if model_args["input_size"] < min_size:
        raise ValueError(
            f"data.image_size={model_args['input_size']} is too small for scale={model_args['scale']} with "
            f"stem={model_args['stem']}: below {min_size} px every stage after the first is 1x1, where a spatial Gamma is just a per-channel one; use image_size >= {min_size} or scale=channel"
        )


# ------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Data:
    """The datasets' description and this rank's loaders (``batch_size`` per process)."""

    name: str
    info: DatasetInfo
    train_loader: DataLoader
    val_loader: DataLoader
    batch_size: int
    pipeline: str = "pil"


def build_data(cfg: DictConfig, runtime: Runtime) -> Data:
    """The ``data`` group's dataset (from :data:`~xnorpp.data.DATASETS`) and this rank's loaders."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data_cfg, dict)
    name = str(data_cfg.pop("name"))
    DATASETS.get(name)  # an unknown name lists the registered ones
    loader = {
        k: data_cfg.pop(k, None) for k in ("batch_size", "eval_batch_size", "num_workers", "stem", "pipeline")
    }
    try:
        train_ds, val_ds, info = build_datasets(name, **data_cfg)
    except (FileNotFoundError, ValueError) as e:
        if name in ("imagefolder", "imagenet"):
            raise type(e)(f"{e} (data.root={cfg.data.root})") from e
        raise
    batch_size = int(loader["batch_size"])
    pipeline = build_pipeline(
        loader["pipeline"], train_ds, val_ds, runtime.device
    )  # decode/augment placement
    train_loader, val_loader, _ = build_loaders(
        pipeline.train, pipeline.val, batch_size=batch_size, num_workers=int(loader["num_workers"] or 0), seed=int(cfg.seed),
        rank=runtime.dist.rank, world_size=runtime.dist.world_size, pin_memory=runtime.device.type == "cuda",
        eval_batch_size=loader["eval_batch_size"],
    )  # fmt: skip
    train_loader, val_loader = pipeline.wrap(train_loader, val_loader, runtime.device)
    if len(train_loader) == 0:
        raise ValueError(
            f"the training set has {len(train_ds)} images, fewer than one batch of data.batch_size="
            f"{batch_size} per process: lower data.batch_size"
        )
    return Data(name, info, train_loader, val_loader, batch_size, pipeline.name)


# ------------------------------------------------------------------------------------------ components
@dataclass
class Components:
    """What a run trains and how: the model (``run_model``: wrapped for DDP or compiled, once
    :meth:`wrap` ran), its arguments and summary, optimizer, schedule, gradient scaler and loss (the
    ``distiller``'s when ``distill`` is set), and where its first weights came from (``init_from``)."""

    model: torch.nn.Module
    model_args: dict[str, Any]
    summary: ModelSummary
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    loss_fn: Any
    lr_scale: float
    run_model: torch.nn.Module | None = None
    init_from: str | None = None
    distiller: Distiller | None = None

    def wrap(self, trainer_cfg: DictConfig, runtime: Runtime) -> None:
        """DistributedDataParallel (with SyncBatchNorm if asked, CUDA only) and ``torch.compile`` if asked."""
        wrapped: torch.nn.Module = self.model
        if runtime.dist.enabled:
            if trainer_cfg.sync_batchnorm and runtime.device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            elif trainer_cfg.sync_batchnorm:
                log.warning(
                    "trainer.sync_batchnorm needs CUDA (torch's SyncBatchNorm); BatchNorm stays per process"
                )
            index = [runtime.device.index] if runtime.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=index)
        self.run_model = torch.compile(wrapped) if trainer_cfg.compile else wrapped


def build_components(cfg: DictConfig, data: Data, runtime: Runtime, speed: accel.Acceleration) -> Components:
    """The model on its device (kernels warmed up), the optimizer over its weight-decay groups with the
    learning rates scaled to the global batch, the per-iteration schedule, the scaler and the loss."""
    model_args = model_args_from_cfg(cfg, data.info.num_classes, data.info.in_chans)
    model = build_model(model_args)
    mapping = getattr(model, "binarization_map", None)  # model=timm: which layers binarize() made binary
    if mapping is not None and runtime.primary:
        log.info("binarization map of %s:\n%s", model_args["name"], mapping.table())
    init_from = str(cfg.init_from) if cfg.get("init_from") and cfg.train else None
    if init_from:  # weights only; a checkpoint of this run, if any, replaces them (resume)
        init_weights(model, init_from)
    model_summary = summary(model, model_args["input_size"], model_args["in_chans"])
    model.to(runtime.device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    precision = str(cfg.trainer.precision)
    speed.warm_up(model, PRECISIONS.get(precision), compiled=bool(cfg.trainer.compile))
    optimizer, scheduler, lr_scale = build_optimization(cfg, model, data, runtime.dist.world_size)
    if precision != "32" and runtime.device.type == "cpu":
        log.warning("trainer.precision=%s on CPU: autocast on CPU is far slower than fp32 here", precision)
    scaler = torch.amp.GradScaler(runtime.device.type) if precision == "16" else None
    loss_fn = instantiate(cfg.loss) if cfg.get("loss") else None
    distiller = build_distiller(cfg, data.info, runtime.device, loss_fn) if cfg.train else None
    return Components(model, model_args, model_summary, optimizer, scheduler, scaler, distiller or loss_fn,
                      lr_scale, init_from=init_from, distiller=distiller)  # fmt: skip


def build_distiller(
    cfg: DictConfig, info: DatasetInfo, device: torch.device, loss_fn: Any = None
) -> Distiller | None:
    """The ``distill`` group's loss with its teacher on ``device``, or None for ``distill=none``; ``kd``'s
    hard term is the run's ``loss``, ``distribution`` uses no labels (and says so if ``loss`` was changed)."""
    d = cfg.get("distill")
    if d is None or d.name == "none":
        return None
    if d.name == "distribution" and cfg.get("loss") and OmegaConf.to_container(cfg.loss) != _DEFAULT_LOSS:
        log.warning("distill=distribution trains on the teacher's distribution only: loss=%s is not used",
                    OmegaConf.to_container(cfg.loss))  # fmt: skip
    teacher = load_teacher(str(d.teacher), info.num_classes, info.in_chans, d.get("teacher_file"))
    return Distiller(str(d.name), teacher.to(device), float(d.get("temperature", 1.0)), float(d.get("weight", 1.0)),
                     hard_loss=loss_fn)  # fmt: skip


_DEFAULT_LOSS = {"_target_": "torch.nn.CrossEntropyLoss", "label_smoothing": 0.0}


def build_optimization(
    cfg: DictConfig, model: torch.nn.Module, data: Data, world_size: int
) -> tuple[torch.optim.Optimizer, Any, float]:
    """Optimizer and schedule from the ``optimizer`` and ``scheduler`` groups, and the learning-rate factor."""
    opt_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
    assert isinstance(opt_cfg, dict) and isinstance(sched_cfg, dict)
    lr_scale = _scale_learning_rates(opt_cfg, sched_cfg, data.batch_size * world_size)
    optimizer = build_optimizer(model, **opt_cfg)
    epochs, limit = int(cfg.trainer.epochs), cfg.trainer.limit_train_batches
    updates_per_epoch = min(len(data.train_loader), int(limit)) if limit else len(data.train_loader)
    scheduler = build_scheduler(optimizer, epochs=epochs, updates_per_epoch=updates_per_epoch, **sched_cfg)
    return optimizer, scheduler, lr_scale


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


# ----------------------------------------------------------------------------------------- checkpoints
def make_checkpointer(cfg: DictConfig, runtime: Runtime) -> Checkpointer:
    ckpt = cfg.trainer.checkpoint
    return Checkpointer(runtime.out_dir / "checkpoints", save=bool(ckpt.save), keep_last=int(ckpt.keep_last),
                        every_steps=ckpt.every_steps, primary=runtime.primary)  # fmt: skip


def resume(
    cfg: DictConfig, checkpointer: Checkpointer, parts: Components, runtime: Runtime, started: float
) -> TrainState:
    """The state to start from: ``ckpt_path`` if given, else (training) the run directory's newest valid
    checkpoint, else a fresh one. Evaluation loads only the checkpoint's weights."""
    fresh = TrainState(attempts=Attempts(start=started))
    found = checkpointer.find(cfg.ckpt_path, search=bool(cfg.train))
    if found is None:
        return fresh
    path, ckpt = found
    Checkpointer.check_model(ckpt, parts.model_args, path)
    if not cfg.train:
        parts.model.load_state_dict(ckpt["model"])
        return fresh
    state = Checkpointer.restore(ckpt, parts.model, parts.optimizer, parts.scaler, primary=runtime.primary,
                                 start=started)  # fmt: skip
    log.info("resumed from %s (epoch %d, step %d)", path, state.epoch, state.global_step)
    return state


# -------------------------------------------------------------------------------------------- tracking
def make_tracker(
    cfg: DictConfig, runtime: Runtime, data: Data, parts: Components, job: JobInfo, state: TrainState
) -> WandbTracker:
    """The wandb run (rank 0; resumed runs continue theirs): named, grouped and tagged by the choices,
    its config the resolved one plus what the run derived; metrics defined, history re-logged."""
    wcfg, out_dir, args = cfg.logger.wandb, runtime.out_dir, parts.model_args
    launch = Path(job.sweep_dir or out_dir).name
    tag_choices = job.choices or {
        "binarization": args["binarization"],
        "scale": args["scale"],
        "data": data.name,
    }
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    tracker = WandbTracker(
        enabled=runtime.primary, mode=str(wcfg.mode), project=str(wcfg.project), entity=wcfg.entity,
        group=wcfg.group or run_group(str(cfg.task_name), args["binarization"], args["scale"], job.overrides),
        name=wcfg.name or run_name(args["binarization"], args["scale"], int(cfg.seed)),
        tags=run_tags(tag_choices, launch, cfg.tags), job_type=wcfg.job_type or ("train" if cfg.train else "eval"),
        notes=wcfg.notes, dir=out_dir, run_id=state.wandb_id, init_timeout=float(wcfg.init_timeout),
        config={**resolved, "choices": job.choices, "overrides": job.overrides, "launch": launch, "model_args": args,
                "data_augment": data.info.augment, "model_summary": parts.summary.to_dict(),
                "world_size": runtime.dist.world_size},
        files=[*sorted((out_dir / ".hydra").glob("*.yaml")), out_dir / "results.json", out_dir / "train.log"],
    )  # fmt: skip
    state.wandb_id = tracker.run_id
    tracker.define_metrics()
    if state.history:  # resumed: what the interrupted process logged may never have reached its wandb file
        tracker.log_history(state.history)
    if runtime.primary:
        log.info("run directory: %s", out_dir.resolve())
        log.info("model %s\n%s", args, parts.summary.table())
    if wcfg.log_model_summary and state.global_step == 0:
        tracker.log_table("model/summary", parts.summary.rows())
    return tracker


# ------------------------------------------------------------------------------------- fit or evaluate
def make_trainer(
    cfg: DictConfig, runtime: Runtime, data: Data, parts: Components, checkpointer: Checkpointer,
    tracker: WandbTracker,
) -> Trainer:  # fmt: skip
    """The :class:`~xnorpp.engine.Trainer` of this run, with the callbacks ``callbacks`` configures."""
    callbacks: list[Callback] = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
    return Trainer(
        parts.model, parts.optimizer, parts.scheduler, data.train_loader, data.val_loader, device=runtime.device,
        options=TrainerOptions.from_config(cfg.trainer), checkpointer=checkpointer, tracker=tracker,
        run_model=parts.run_model, scaler=parts.scaler, primary=runtime.primary, loss_fn=parts.loss_fn,
        callbacks=callbacks,
        meta={"model_args": parts.model_args, "config_yaml": OmegaConf.to_yaml(cfg, resolve=True)},
    )  # fmt: skip


def fit_or_evaluate(
    cfg: DictConfig, trainer: Trainer, state: TrainState, tracker: WandbTracker
) -> dict[str, Any]:
    """Train (``train=true``) or evaluate ``ckpt_path``'s weights (``train=false``)."""
    if cfg.train:
        return trainer.fit(state)
    metrics = trainer.evaluate()
    tracker.log({**metrics, "epoch": 0})
    return {**metrics, "epochs": 0, "ckpt_path": str(cfg.ckpt_path)}


# --------------------------------------------------------------------------------------------- results
def run_facts(
    cfg: DictConfig, runtime: Runtime, data: Data, parts: Components, job: JobInfo, tracker: WandbTracker,
    state: TrainState,
) -> dict[str, Any]:  # fmt: skip
    """What results.json records beside the metrics: sizes, arguments, choices, rates, where things are."""
    s, mapping = parts.summary, getattr(parts.model, "binarization_map", None)
    return {
        "params/binary": s.params_binary, "params/real": s.params_real, "params/total": s.params_total,
        "model/memory_mb": s.memory_bytes / 2**20, "model/compression": s.compression, "model/ops": s.ops,
        "model_args": parts.model_args, "choices": job.choices, "overrides": job.overrides,
        "data_augment": data.info.augment, "data_pipeline": data.pipeline,
        "lr": parts.optimizer.defaults["lr"],  # optimizer.lr scaled to the global batch
        "lr_scale": parts.lr_scale, "run_dir": str(runtime.out_dir.resolve()), "wandb_dir": tracker.run_dir,
        "wandb_mode": tracker.status,
        **state.attempts.to_dict(),  # wall_time_s over every attempt, attempts, requeues
        "world_size": runtime.dist.world_size, "init_from": parts.init_from,
        **({"distill": distill_facts(cfg, runtime, data, parts.distiller)} if parts.distiller else {}),
        **({"binarization_map": mapping.rows()} if mapping is not None else {}),
    }  # fmt: skip


def distill_facts(cfg: DictConfig, runtime: Runtime, data: Data, distiller: Distiller) -> dict[str, Any]:
    """What results.json says of the distillation: its settings and the teacher's own val top-1."""
    t = cfg.trainer
    limit = int(t.limit_val_batches) if t.limit_val_batches else None
    teacher = evaluate(distiller.teacher, data.val_loader, device=runtime.device, precision=str(t.precision),
                       channels_last=bool(t.channels_last), max_steps=limit)  # fmt: skip
    settings = OmegaConf.to_container(cfg.distill, resolve=True)
    assert isinstance(settings, dict)
    return {**settings, "teacher_val_top1": teacher["val/top1"]}


FINAL_KEYS = ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1")


def write_run_results(
    cfg: DictConfig, runtime: Runtime, tracker: WandbTracker, results: dict[str, Any]
) -> None:
    """results.json and the wandb summary (rank 0), and a last line that says where they are."""
    if not runtime.primary:
        return
    path = runtime.out_dir / "results.json"
    write_results(path, results)
    tracker.summary(_headline(results))
    log.info(
        "done: val top-1 %.2f%% (best %.2f%% at epoch %d), %.0f s; results in %s",
        results.get("val/top1", float("nan")), results.get("best/val/top1", float("nan")),
        results.get("best/epoch", -1), results["wall_time_s"], path,
    )  # fmt: skip
    if tracker.run_dir and tracker.status == "offline":
        log.info("wandb offline run: %s (upload with `wandb sync %s`)", tracker.run_dir, tracker.run_dir)


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
