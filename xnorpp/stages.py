"""Multi-stage training: one command runs a recipe of stages, each a full run of :func:`xnorpp.run.train`.

``stages`` maps stage names, in order, to config values merged onto the run's config for that stage::

    stages:
      activations:                         # stage 1: binary activations, real weights
        binarization: {name: activation_only}
        optimizer: {weight_decay: 1e-5}
      weights:                             # stage 2: binary weights too, from stage 1's weights
        binarization: {name: real_downsample}
        optimizer: {weight_decay: 0.0}

Values common to every stage (epochs, learning rate, data) stay in the run's config, where the command
line sets them; a value a stage sets wins for that stage (``++stages.weights.trainer.epochs=5``). Each
stage runs in ``<run dir>/stage<i>_<name>/`` with its own checkpoints, ``results.json`` and wandb run
(one wandb group for all, job type = the stage's name). Stage ``i > 1`` starts from the weights of stage
``i - 1``'s last checkpoint (``init_from``); stage 1 from the run's ``init_from``, if any. A stage with a
``results.json`` is done and skipped when the command runs again in the same directory, an interrupted
stage resumes from its own checkpoints: a staged run resumes at any point. The run's ``results.json``
holds the last stage's numbers, epochs and steps summed over the stages, the history of all stages on
one epoch axis, and ``stages``: every stage's numbers.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from .job import job_info
from .track import write_results
from .track.naming import run_group

__all__ = ["STAGE_KEYS", "init_weights", "run_stages", "stage_configs"]

log = logging.getLogger("xnorpp")

# what the run's results.json keeps of each stage
STAGE_KEYS = (
    "val/top1", "val/top5", "best/val/top1", "best/epoch", "epochs", "global_step", "train/loss",
    "train/img_per_s", "wall_time_s", "params/binary", "init_from",
)  # fmt: skip


def stage_dir(out_dir: Path, index: int, name: str) -> Path:
    return out_dir / f"stage{index}_{name}"


def stage_configs(cfg: DictConfig, group: str | None = None) -> list[tuple[str, DictConfig]]:
    """``(name, config)`` of every stage: the run's config (without ``stages``) merged with the stage's
    values, its own ``output_dir``, ``init_from`` the previous stage's ``last.pt`` (stage 1: the run's),
    wandb ``group`` (given, or the run's), ``name`` and ``job_type``, and a ``stage:<name>`` tag."""
    out_dir = Path(str(cfg.output_dir))
    base = copy.deepcopy(cfg)
    with open_dict(base):
        base.stages = None
    configs: list[tuple[str, DictConfig]] = []
    previous: Path | None = None
    for index, (name, values) in enumerate(cfg.stages.items(), start=1):
        try:
            stage = OmegaConf.merge(base, values or {})
        except Exception as e:  # a key the config does not have: name the stage
            raise ValueError(f"stages.{name}: {e}") from None
        assert isinstance(stage, DictConfig)
        directory = stage_dir(out_dir, index, str(name))
        with open_dict(stage):
            stage.output_dir = str(directory)
            if previous is not None:
                stage.init_from = str(previous / "checkpoints" / "last.pt")
            wandb = stage.logger.wandb
            wandb.group = wandb.group or group
            if wandb.name:
                wandb.name = f"{wandb.name}-{name}"
            wandb.job_type = str(name)
            stage.tags = [*stage.tags, f"stage:{name}"]
        configs.append((str(name), stage))
        previous = directory
    return configs


def _check(cfg: DictConfig) -> None:
    if not isinstance(cfg.stages, DictConfig) or not len(cfg.stages):
        raise ValueError(f"stages must map stage names to config values, got {cfg.stages!r}")
    if cfg.ckpt_path:
        raise ValueError(
            "ckpt_path does not apply to a staged run: run the same command again in its directory "
            "(hydra.run.dir=<run dir>) and every stage resumes from its own checkpoints"
        )
    if not cfg.trainer.checkpoint.save and len(cfg.stages) > 1:
        raise ValueError(
            "each stage starts from the previous stage's checkpoint: trainer.checkpoint.save must be true"
        )


def run_stages(cfg: DictConfig, train: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
    """Run (or resume) every stage of ``cfg.stages`` in order, each by ``train`` (:func:`xnorpp.run.train`);
    returns the run's results."""
    _check(cfg)
    out_dir = Path(str(cfg.output_dir))
    primary = int(os.environ.get("RANK", "0")) == 0
    overrides = job_info().overrides
    last_values = list(cfg.stages.values())[-1] or {}
    binarization = (
        OmegaConf.select(OmegaConf.create(last_values), "binarization.name") or cfg.binarization.name
    )
    group = cfg.logger.wandb.group or run_group(
        str(cfg.task_name), str(binarization), str(cfg.scale.name), overrides
    )
    names = list(cfg.stages)
    stages: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for index, (name, stage_cfg) in enumerate(stage_configs(cfg, group), start=1):
        directory = Path(stage_cfg.output_dir)
        done = directory / "results.json"
        if done.is_file():
            results = json.loads(done.read_text())
            log.info("stage %d/%d %s: done (%s), skipped", index, len(names), name, done)
        else:
            log.info("stage %d/%d %s in %s", index, len(names), name, directory)
            results = train(stage_cfg)
        stages.append({"name": name, "dir": str(directory.resolve()),
                       "binarization": results.get("model_args", {}).get("binarization"),
                       **{k: results.get(k) for k in STAGE_KEYS}})  # fmt: skip
    history: list[dict[str, Any]] = []
    epochs = steps = 0
    for stage in stages:
        rows = json.loads((Path(stage["dir"]) / "results.json").read_text()).get("history", [])
        history += [{**row, "epoch": row.get("epoch", 0) + epochs, "global_step": row.get("global_step", 0) + steps}
                    for row in rows]  # fmt: skip
        epochs += int(stage.get("epochs") or 0)
        steps += int(stage.get("global_step") or 0)
    total = {**results, "epochs": epochs, "global_step": steps, "history": history, "stages": stages,
             "wall_time_s": sum(float(s.get("wall_time_s") or 0.0) for s in stages),
             "run_dir": str(out_dir.resolve()), "wandb_group": group}  # fmt: skip
    if primary:
        write_results(out_dir / "results.json", total)
        log.info(
            "stages done: %s",
            ", ".join(f"{s['name']} {s['val/top1']:.2f}%" for s in stages if s["val/top1"] is not None),
        )
    return total


def init_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the weights of a checkpoint of this framework (training checkpoint) into ``model`` where
    names and shapes agree (``init_from``): a stage's model may add tensors (scale factors, learned
    thresholds) that keep their initialisation. A shape mismatch, or nothing in common, is an error.
    Returns ``{"loaded", "kept", "unused"}`` (counts and names)."""
    from .export import load_checkpoint

    state, _ = load_checkpoint(path)
    own = model.state_dict()
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(
            f"init_from={path}: tensors of other shapes, e.g. {wrong[0]!r} "
            f"{tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}: not this architecture"
        )
    common = [k for k in own if k in state]
    if not common:
        raise ValueError(f"init_from={path}: no tensor of the checkpoint matches this model")
    with torch.no_grad():
        for k in common:
            own[k].copy_(state[k])
    kept = [k for k in own if k not in state]
    unused = [k for k in state if k not in own]
    log.info(
        "init_from %s: %d tensors loaded, %d kept their initialisation%s, %d of the checkpoint unused",
        path, len(common), len(kept), f" ({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''})" if kept else "",
        len(unused),
    )  # fmt: skip
    return {"loaded": len(common), "kept": kept, "unused": unused}
