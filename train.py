"""Train (or evaluate) a binary network: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                        # the original's model on bundled MNIST, CPU
    python train.py binarization=full_binary scale=channel optimizer=adam scheduler=step
    python train.py experiment=seed_resnet18_imagenet data.root=/data/imagenet
    python train.py +sweep=binarization                    # ablation sweep (multirun)
    python train.py train=false ckpt_path=RUN/checkpoints/best.pt   # evaluate a checkpoint
    torchrun --standalone --nproc_per_node=8 train.py experiment=seed_resnet18_imagenet data.batch_size=32

Returns ``best/val/top1`` (percent) so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sys
from types import ModuleType

import hydra
from omegaconf import DictConfig

HERE = os.path.dirname(os.path.abspath(__file__))
# trainer.malloc=keep|system, also in a sweep's list of values (keep,jemalloc: all jobs of a process share
# its allocator, and one asking for jemalloc then stops with an error naming the preload command)
_GLIBC = re.compile(r"^\+{0,2}trainer\.malloc=.*\b(keep|system)\b")


def _load(relative: str) -> ModuleType:
    """A module of the package loaded from its file: importing the package (torch, timm) first would cost
    seconds that a re-run with jemalloc repeats."""
    spec = importlib.util.spec_from_file_location(f"_xnorpp_{os.path.basename(relative)[:-3]}",
                                                  os.path.join(HERE, relative))  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configured_glibc(argv: list[str]) -> bool:
    """Whether the config of this command asks for glibc (``trainer.malloc`` ``keep`` or ``system``): its
    YAML files and overrides composed with Hydra's compose API, and any value of a sweep over
    ``trainer.malloc``. Other sweeps are left out of the composition; command-line options other than
    ``-m`` (``--config-dir``, ...) leave the command line's ``trainer.malloc=`` values alone to decide."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = any(_GLIBC.match(a) for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return swept
    try:
        overrides = [a for a in argv if a not in ("-m", "--multirun")]
        parsed = OverridesParser.create().parse_overrides(overrides)
        fixed = [a for a, o in zip(overrides, parsed) if not o.is_sweep_override()]
        _load("xnorpp/config_source.py").register()  # the sweep/ presets (+sweep=NAME)
        with initialize_config_dir(config_dir=os.path.join(HERE, "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=fixed)
        return swept or str(cfg.trainer.malloc) in ("keep", "system")
    except Exception:  # an override Hydra will reject with its own message
        return swept


def _preload_jemalloc(argv: list[str]) -> None:
    """Re-run this command with jemalloc preloaded (``xnorpp.engine.memory.preload_jemalloc``) when it was
    started as ``python train.py ...`` (not in a notebook, an interactive interpreter or a debugger), unless
    the config asks for glibc (read only when a re-run would happen)."""
    _load("xnorpp/engine/memory.py").preload_jemalloc(__file__, keep_glibc=lambda: _configured_glibc(argv))


def _share_run_dir_across_ranks(argv: list[str]) -> list[str]:
    """Under torchrun, make every rank use rank 0's run directory (timestamps may differ by a second).

    Joins the process group early (gloo on CPU, plus NCCL for CUDA tensors when available), broadcasts
    rank 0's timestamp, and keeps Hydra's files and log to rank 0.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or any(a.startswith(("-m", "--multirun", "--cfg", "--help", "-h")) for a in argv):
        return argv
    import time

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        extra.append(f"hydra.run.dir=outputs/${{task_name}}/{stamp[0]}")
    if dist.get_rank() > 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return argv + extra


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from xnorpp.run import Preempted, train

    try:
        results = train(cfg)
    except Preempted:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # the ranks agreed to exit for a requeue; torchrun (or srun) terminates the ranks still exiting when
            # the first one is gone: that SIGTERM must not turn this rank's requeue exit code into a kill
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    metric = results.get("best/val/top1") if cfg.train else results.get("val/top1")
    return None if metric is None else float(metric)


if __name__ == "__main__":
    _preload_jemalloc(sys.argv[1:])  # (before anything else: the process may start again from here)
    _load("xnorpp/resolvers.py").register()  # before Hydra composes the launcher's config
    _load("xnorpp/config_source.py").register()  # +sweep=NAME reads sweep/ (hydra.searchpath in train.yaml)
    sys.argv = [sys.argv[0], *_share_run_dir_across_ranks(sys.argv[1:])]
    main()
