"""Train-step benchmark of ``resnet18_preact_bin`` against a real-valued floor and a naive binary net.

``python -m xnorpp.bench --preset all`` times one SGD training step (forward, backward,
``optimizer.step``) on random data for each configuration:

- ``floor``: the same architecture with ``binarization="fp"`` (everything real): the speed and memory a
  binary network should not fall far below / rise far above;
- ``xnorpp``: ``full_binary`` with the learned rank-1 ``Gamma`` as the library builds it (the fused
  sign-conv-Gamma node of :mod:`xnorpp.nn.fused`; on CPU in fp32 its forward convs run as exact
  ``int8`` convs, :mod:`xnorpp.nn.int8_conv`, unless ``--no-int8-conv``);
- ``naive``: the same math written the plain way, built here by swapping modules: a sign autograd
  Function that saves its fp32 input (backward ``grad * (|x| <= 1)``), the same binary weights, and the
  three rank-1 factors multiplied one after another onto the activation (``y * alpha * beta * gamma``);
- ``unfused`` (opt-in via ``--configs``): the library with ``fused = False`` (bool STE mask + fp32
  ``+-1`` conv input + fp32 ``y`` saved).

Measurements. Each of ``--repeats`` rounds starts one worker process per configuration (forked from a
``forkserver`` that has imported torch); the workers build their models, then take training steps in
turn (floor, xnorpp, naive, floor, ...; the order alternates between rounds), so that steps compared
with each other run seconds apart, under the same load of a shared machine. Numbers are medians over
the rounds; ratios ``X / floor`` and ``X / naive`` are medians of per-pair ratios.

- img/s: ``batch / median step time`` over ``--steps`` timed steps after ``--warmup`` steps; its ratios
  are medians over the pairs of timed steps taken back to back;
- peak RSS MB (CPU): ``ru_maxrss`` after the timed steps minus the resident set (``/proc/self/statm``)
  just before the first step, model, optimizer and batch already built and the binary layers' kernels
  compiled (:func:`~xnorpp.nn.fused.warm_up_fused`, as the trainer does on CPU; that resident set is
  ``built_mb`` in the JSON). ``ru_maxrss`` is a per-process
  high-water mark, hence one process per run. With glibc's default ``malloc`` it includes freed heap
  memory that is not handed back to the OS (fragmentation), which depends on the allocation pattern
  as much as on the model. On CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before;
- live peak MB and saved MB come from a separate memory pass, one process per configuration, whose
  glibc is set up before anything is allocated to give every block of 64 KiB or more its own ``mmap``
  and to return freed memory (``mallopt``), so that its RSS follows the memory actually allocated:
  after one step (gradients and momentum buffers exist), the peak RSS is reset
  (``/proc/self/clear_refs``) and one more step is measured; on CUDA ``max_memory_allocated`` as above;
- saved MB (same step): bytes of the tensors autograd saves in one training forward
  (``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters and buffers excluded):
  exact and deterministic, a companion of the noisy peaks.

``--in-process`` runs everything in this process, one configuration after the other (for smoke tests:
its CPU peaks mean little).

``python -m xnorpp.bench loader DATA_ROOT`` measures the input pipelines instead (:mod:`xnorpp.bench_loader`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import accel
from .engine.loop import PRECISIONS
from .nn import BinaryConv2d, LearnedScale, ScaleFactor
from .nn.fused import set_fused

__all__ = [
    "CONFIGS",
    "PRESETS",
    "TARGETS",
    "IsolatedRun",
    "NaiveRank1Scale",
    "TrainStepRun",
    "build_config",
    "format_table",
    "main",
    "make_naive",
    "naive_sign",
    "run_config",
    "run_isolated",
    "saved_tensor_bytes",
]

CONFIGS: tuple[str, ...] = ("floor", "xnorpp", "naive", "unfused")
DEFAULT_CONFIGS: tuple[str, ...] = ("floor", "xnorpp", "naive")
PRESETS: dict[str, dict[str, Any]] = {
    "cpu32": {"image_size": 32, "batch_size": 128, "stem": "small", "num_classes": 10},
    "cpu224": {"image_size": 224, "batch_size": 32, "stem": "imagenet", "num_classes": 1000},
}
DEFAULTS: dict[str, Any] = {"steps": 3, "warmup": 3, "repeats": 3, **PRESETS["cpu32"]}
# the targets for ``xnorpp``: (ratio key, comparison, bound)
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("img_s_vs_floor", ">=", 0.95),
    ("img_s_vs_naive", ">=", 1.2),
    ("peak_rss_vs_floor", "<=", 1.2),
    ("peak_rss_vs_naive", "<=", 0.7),
    ("live_peak_vs_floor", "<=", 1.2),
    ("live_peak_vs_naive", "<=", 0.7),
)
METRICS: tuple[str, ...] = ("img_s", "peak_rss_mb", "live_peak_mb", "saved_mb")
MB = 2**20
_LIVE_THRESHOLD = 64 * 2**10  # blocks from 64 KiB up get their own mmap in the live-peak step


class _NaiveSign(torch.autograd.Function):
    """``sign`` (``+1`` for ``x >= 0``) saving the fp32 input; backward ``grad * (|x| <= 1)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def naive_sign(x: Tensor) -> Tensor:
    """The naive binary activation: ``sign_ste``'s forward and gradient, saving ``x`` in full."""
    return _NaiveSign.apply(x)


class NaiveRank1Scale(ScaleFactor):
    """Rank-1 ``Gamma`` applied as three multiplies, ``y * alpha * beta * gamma`` (shares parameters)."""

    def __init__(self, learned: LearnedScale) -> None:
        super().__init__()
        self.name = learned.name
        self.alpha, self.beta, self.gamma = learned.alpha, learned.beta, learned.gamma

    def forward(self, y: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        return y * self.alpha.to(y.dtype) * self.beta.to(y.dtype) * self.gamma.to(y.dtype)


def make_naive(model: nn.Module) -> int:
    """Turn the binary-input convs of ``model`` into the naive implementation in place; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, BinaryConv2d) and m.binarize_inputs:
            m.fused = False
            m._sign = naive_sign
            if isinstance(m.scale_factor, LearnedScale) and m.scale_factor.name == "rank1":
                m.scale_factor = NaiveRank1Scale(m.scale_factor)
            count += 1
    return count


def build_config(name: str, image_size: int, num_classes: int, stem: str) -> nn.Module:
    """The ``resnet18_preact_bin`` of configuration ``name`` (one of :data:`CONFIGS`)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; valid choices: {', '.join(CONFIGS)}")
    model = timm.create_model(
        "resnet18_preact_bin", binarization="fp" if name == "floor" else "full_binary", scale="rank1",
        num_classes=num_classes, input_size=image_size, stem=stem,
    )  # fmt: skip
    if name == "naive":
        make_naive(model)
    elif name == "unfused":
        set_fused(model, False)
    return model


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Sequence[Tensor] = ()) -> dict[str, int]:
    """Bytes autograd saves while ``fn()`` runs, per dtype and ``"total"``; each storage counted once.

    Tensors sharing storage with ``exclude`` (e.g. parameters and buffers) are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    out: dict[str, int] = {"total": 0}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            key = str(t.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + storage.nbytes()
            out["total"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return out


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _autocast(device: str, precision: str) -> Any:
    if precision == "32":
        return nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``; elsewhere the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _maxrss_bytes()


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``/proc/self/clear_refs``; ``ru_maxrss`` follows)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class TrainStepRun:
    """One configuration's model, optimizer and batch, built for timing single SGD training steps.

    ``step()`` runs one step and returns its seconds; ``finish()`` returns the result dict (peaks
    relative to the memory before the first step, and optionally the live peak and saved bytes of one
    more step). Build it in a fresh process (:class:`IsolatedRun`) for meaningful CPU peaks.
    """

    def __init__(
        self,
        name: str,
        image_size: int,
        batch_size: int,
        num_classes: int = 10,
        stem: str = "small",
        device: str = "cpu",
        precision: str = "32",
        channels_last: bool = False,
        compile: bool = False,
        threads: int | None = None,
        seed: int = 0,
        live_malloc: bool = False,
        malloc: str = "auto",
        kernels: str = "compiled",
        int8_conv: bool = True,
    ) -> None:
        # the allocator's policy before anything is allocated: a memory run makes RSS follow live memory
        self.live = self.cuda = torch.device(device).type == "cuda"
        if live_malloc and not self.cuda:
            self.live = accel.follow_live_memory(_LIVE_THRESHOLD)
        speed = accel.Settings(
            kernels=kernels, int8_conv=int8_conv, malloc="system" if live_malloc else malloc
        )
        self.speed = accel.configure(speed, device).__enter__()  # as the trainer: restored by run_config
        torch.set_num_threads(threads or available_cores())
        torch.backends.cudnn.benchmark = True  # as the trainer does on CUDA (fixed shapes)
        torch.manual_seed(seed)
        self.name, self.batch_size, self.precision = name, batch_size, precision
        self.dev = torch.device(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_config(name, image_size, num_classes, stem).to(self.dev, memory_format=fmt).train()
        self.speed.warm_up(self.model, PRECISIONS.get(precision), compiled=compile)  # as train()
        self.forward: Callable[[Tensor], Tensor] = torch.compile(self.model) if compile else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.scaler = torch.amp.GradScaler(self.dev.type, enabled=precision == "16")
        self.x = torch.randn(batch_size, 3, image_size, image_size, device=self.dev).contiguous(
            memory_format=fmt
        )
        self.target = torch.randint(0, num_classes, (batch_size,), device=self.dev)
        self.times: list[float] = []
        self.base = self.built = self._base_memory()

    def _base_memory(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            return torch.cuda.memory_allocated(self.dev)
        return _rss_bytes()

    def _peak_mb(self) -> float:
        # Linux updates ru_maxrss lazily (when memory is unmapped): never report below the current RSS
        peak = torch.cuda.max_memory_allocated(self.dev) if self.cuda else max(_maxrss_bytes(), _rss_bytes())
        return (peak - self.base) / MB

    def _step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with _autocast(self.dev.type, self.precision):
            loss = F.cross_entropy(self.forward(self.x), self.target)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def step(self) -> float:
        """One training step; returns its wall-clock seconds."""
        t0 = time.perf_counter()
        self._step()
        seconds = time.perf_counter() - t0
        self.times.append(seconds)
        return seconds

    def finish(
        self, warmup: int, measure_live_peak: bool = False, measure_saved: bool = False
    ) -> dict[str, Any]:
        """The result of the steps so far (the first ``warmup`` untimed), then the optional extra step."""
        times = self.times[warmup:]
        result: dict[str, Any] = {
            "config": self.name,
            "step_s": times,
            "img_s": self.batch_size / statistics.median(times) if times else float("nan"),
            "peak_rss_mb": self._peak_mb(),
            # the built process (model, optimizer, batch, compiled kernels) the peaks are measured above
            "built_mb": self.built / MB,
            "live_peak_mb": float("nan"),
            "saved_mb": float("nan"),
            # kernels ("eager" if compiling failed), whether the binary forward convs ran as exact int8 convs
            # and their element-wise work in the C kernels
            **{k: v for k, v in self.speed.report().items() if k in ("kernels", "int8_conv", "c_kernels")},
        }
        if measure_live_peak or measure_saved:  # one more step, watched by the allocator and/or autograd
            self.opt.zero_grad(set_to_none=True)
            live = measure_live_peak and self.live and (self.cuda or _reset_peak_rss())
            self.base = self._base_memory()
            if measure_saved:
                saved = saved_tensor_bytes(self._step, [*self.model.parameters(), *self.model.buffers()])
                result["saved_mb"] = saved.pop("total") / MB
                result["saved_mb_by_dtype"] = {k: v / MB for k, v in saved.items()}
            else:
                self._step()
            if live:
                result["live_peak_mb"] = self._peak_mb()
        return result


def run_config(
    name: str,
    image_size: int,
    batch_size: int,
    steps: int,
    warmup: int,
    measure_live_peak: bool = False,
    measure_saved: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Build configuration ``name`` in this process, run ``warmup + steps`` steps; the result dict."""
    old_threads = torch.get_num_threads()
    try:
        with accel.preserved():  # this process's speed switches as they were
            run = TrainStepRun(name, image_size, batch_size, **kwargs)
            for _ in range(warmup + steps):
                run.step()
            return run.finish(warmup, measure_live_peak, measure_saved)
    finally:
        torch.set_num_threads(old_threads)


def _serve(kwargs: dict[str, Any], conn: Connection) -> None:
    """Worker process: build a :class:`TrainStepRun`, then answer ``step`` / ``finish`` requests."""
    try:
        run = TrainStepRun(**kwargs)
        conn.send(("ok", None))
        while True:
            command, args = conn.recv()
            if command == "step":
                conn.send(("ok", run.step()))
            else:
                conn.send(("ok", run.finish(**args)))
                return
    except BaseException as e:  # hand any failure to the parent instead of dying silently
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _mp_context() -> BaseContext:
    """``forkserver`` with torch and xnorpp preloaded (fresh processes in well under a second), else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "timm", "xnorpp"])
        return ctx
    return mp.get_context("spawn")


class IsolatedRun:
    """A :class:`TrainStepRun` in its own process (its ``ru_maxrss`` covers this run only)."""

    def __init__(self, kwargs: dict[str, Any], ctx: BaseContext | None = None) -> None:
        ctx = ctx or _mp_context()
        self.name = kwargs["name"]
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(kwargs, child), daemon=True)
        self.proc.start()
        child.close()

    def _reply(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            status, payload = "error", "the worker process died (out of memory?)"
        if status != "ok":
            self.proc.join()
            raise RuntimeError(
                f"benchmark run {self.name!r} failed (exit code {self.proc.exitcode}): {payload}"
            )
        return payload

    def ready(self) -> None:
        """Wait until the model is built."""
        self._reply()

    def step(self) -> float:
        """One training step in the worker; its seconds."""
        self.conn.send(("step", None))
        return self._reply()

    def finish(self, **args: Any) -> dict[str, Any]:
        """:meth:`TrainStepRun.finish` in the worker, which then exits."""
        self.conn.send(("finish", args))
        result = self._reply()
        self.proc.join()
        return result


def run_isolated(kwargs: dict[str, Any], ctx: BaseContext | None = None) -> dict[str, Any]:
    """:func:`run_config` in a new process (with ``measure_live_peak``, under the live-peak malloc policy)."""
    build = {
        k: v for k, v in kwargs.items() if k not in ("steps", "warmup", "measure_live_peak", "measure_saved")
    }
    run = IsolatedRun({**build, "live_malloc": kwargs.get("measure_live_peak", False)}, ctx)
    run.ready()
    for _ in range(kwargs["warmup"] + kwargs["steps"]):
        run.step()
    return run.finish(
        warmup=kwargs["warmup"],
        measure_live_peak=kwargs.get("measure_live_peak", False),
        measure_saved=kwargs.get("measure_saved", False),
    )


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN (unmeasured)
    return statistics.median(values) if values else float("nan")


BUILD_KEYS: tuple[str, ...] = (
    "image_size", "batch_size", "num_classes", "stem", "device", "precision", "channels_last", "compile",
    "threads", "malloc", "kernels", "int8_conv",
)  # fmt: skip


def _memory_pass(
    settings: dict[str, Any], configs: Sequence[str], ctx: BaseContext | None
) -> dict[str, dict[str, Any]]:
    """Per configuration, in a process whose glibc returns freed memory: live peak and saved bytes."""
    build = {k: settings[k] for k in BUILD_KEYS}
    finish = {"warmup": 1, "measure_saved": True, "measure_live_peak": ctx is not None}
    if ctx is None:
        return {name: run_config(name=name, steps=0, **{**build, **finish}) for name in configs}
    out = {}
    for name in configs:
        run = IsolatedRun({"name": name, **build, "live_malloc": True}, ctx)
        run.ready()
        run.step()  # allocates the gradients and the momentum buffers
        out[name] = run.finish(**finish)
    return out


def _timed_round(
    settings: dict[str, Any], order: Sequence[str], ctx: BaseContext | None
) -> dict[str, dict[str, Any]]:
    """One round: every configuration's warm-up and timed steps, interleaved step by step."""
    build = {k: settings[k] for k in BUILD_KEYS}
    warmup, steps = settings["warmup"], settings["steps"]
    if ctx is None:  # in this process: one configuration after the other
        return {name: run_config(name=name, steps=steps, warmup=warmup, **build) for name in order}
    runs = {name: IsolatedRun({"name": name, **build}, ctx) for name in order}
    try:
        for run in runs.values():
            run.ready()
        for _ in range(warmup + steps):
            for run in runs.values():
                run.step()
        return {name: run.finish(warmup=warmup) for name, run in runs.items()}
    finally:
        for run in runs.values():
            if run.proc.is_alive():
                run.proc.kill()


def bench_setting(
    settings: dict[str, Any], configs: Sequence[str], log: Callable[[str], None] = print
) -> dict[str, Any]:
    """A memory pass and the timed rounds of one setting; a summary dict with medians, ratios, targets."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    ctx = None if settings["in_process"] else _mp_context()
    if settings.get("memory_pass", True):
        memory = _memory_pass(settings, configs, ctx)
    else:  # e.g. with --compile, where every process compiles again
        memory = {name: {"live_peak_mb": float("nan"), "saved_mb": float("nan")} for name in configs}
    for name, res in memory.items():
        log(f"  memory {name:8s} live peak {res['live_peak_mb']:6.0f} MB  saved {res['saved_mb']:6.0f} MB")
    for rnd in range(settings["repeats"]):
        order = list(configs) if rnd % 2 == 0 else list(reversed(configs))
        results = _timed_round(settings, order, ctx)
        for name in order:
            res = results[name]
            for key in ("live_peak_mb", "saved_mb", "saved_mb_by_dtype"):
                res[key] = memory[name].get(key, float("nan"))
            runs[name].append(res)
            log(
                f"  round {rnd + 1}/{settings['repeats']} {name:8s} {res['img_s']:8.2f} img/s  "
                f"peak RSS {res['peak_rss_mb']:6.0f} MB"
            )
    summary = {
        name: {
            **{m: _median([r[m] for r in rs]) for m in METRICS},
            "img_s_rounds": [r["img_s"] for r in rs],
            "step_s_rounds": [r["step_s"] for r in rs],
            "peak_rss_mb_rounds": [r["peak_rss_mb"] for r in rs],
            "saved_mb_by_dtype": rs[0].get("saved_mb_by_dtype", {}),
            "built_mb": _median([r["built_mb"] for r in rs]),
            "int8_conv": any(r["int8_conv"] for r in rs),
            "c_kernels": any(r["c_kernels"] for r in rs),
        }
        for name, rs in runs.items()
    }
    ratios: dict[str, dict[str, float]] = {}
    for name in configs:
        ratios[name] = {}
        for ref in ("floor", "naive"):
            if ref == name or ref not in runs:
                continue
            pairs = list(zip(runs[name], runs[ref]))
            # img/s: per pair of steps run back to back (same round, same step index)
            step_ratios = [tb / ta for a, b in pairs for ta, tb in zip(a["step_s"], b["step_s"])]
            ratios[name][f"img_s_vs_{ref}"] = _median(step_ratios)
            for m in METRICS[1:]:
                per_round = [a[m] / b[m] for a, b in pairs if b[m] > 0]
                ratios[name][f"{m.removesuffix('_mb')}_vs_{ref}"] = _median(per_round)
    targets = {}
    for key, op, bound in TARGETS:
        value = ratios.get("xnorpp", {}).get(key, float("nan"))
        if value == value:
            met = value >= bound if op == ">=" else value <= bound
            targets[key] = {"target": f"{op} {bound}", "value": value, "met": met}
    return {"settings": settings, "configs": summary, "ratios": ratios, "targets": targets}


def _fmt(value: float, digits: int) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def _malloc_label(settings: dict[str, Any]) -> str:
    """``jemalloc``, ``keep`` or ``system``, and the allocator where a glibc policy ran on jemalloc."""
    policy, alloc = str(settings.get("malloc", "system")), settings.get("allocator")
    return f"{policy} on jemalloc" if alloc == "jemalloc" and policy != "jemalloc" else policy


def format_table(result: dict[str, Any]) -> str:
    """Markdown report of one :func:`bench_setting` result: a table and the targets."""
    s = result["settings"]
    cuda = str(s["device"]).startswith("cuda")  # peaks are torch.cuda.max_memory_allocated there
    c_kernels = any(c.get("c_kernels") for c in result.get("configs", {}).values())
    head = (
        f"### resnet18_preact_bin {s['image_size']}x{s['image_size']}, batch {s['batch_size']}, "
        f"{s['device']}, precision {s['precision']}{', channels_last' if s['channels_last'] else ''}"
        f"{', compiled' if s['compile'] else ''}, {s['threads']} threads, "
        f"{'' if cuda else 'malloc ' + _malloc_label(s) + ', '}"
        f"{s.get('kernels', 'eager')} kernels{' (C)' if c_kernels else ''}"
        f"{'' if cuda else ', int8 conv ' + ('on' if s.get('int8_conv') else 'off')}: "
        f"{s['steps']} timed steps after "
        f"{s['warmup']} warm-up, median of {s['repeats']} rounds\n\n"
    )
    cols = [("img/s", "img_s", 2)] + [
        (f"{label} vs {ref}", f"{key}_vs_{ref}", 2)
        for label, key in (
            ("img/s", "img_s"),
            ("peak RSS", "peak_rss"),
            ("live peak", "live_peak"),
            ("saved", "saved"),
        )
        for ref in ("floor", "naive")
    ]
    rows = [
        f"| config | img/s | {'peak alloc' if cuda else 'peak RSS'} MB | live peak MB | saved MB | "
        + " | ".join(c[0] for c in cols[1:])
        + " |",
        "|---|" + "---:|" * (3 + len(cols)),
    ]
    for name, c in result["configs"].items():
        r = result["ratios"].get(name, {})
        cells = [
            _fmt(c["img_s"], 2),
            _fmt(c["peak_rss_mb"], 0),
            _fmt(c["live_peak_mb"], 0),
            _fmt(c["saved_mb"], 0),
        ]
        cells += [_fmt(r.get(key, float("nan")), digits) for _, key, digits in cols[1:]]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    lines = [
        f"- xnorpp {key}: {t['value']:.3f} (target {t['target']}): {'met' if t['met'] else 'NOT met'}"
        for key, t in result["targets"].items()
    ]
    return head + "\n".join(rows) + ("\n\n" + "\n".join(lines) if lines else "")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m xnorpp.bench``."""
    p = argparse.ArgumentParser(prog="python -m xnorpp.bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--preset", choices=[*PRESETS, "all"], default=None, help="cpu32 (default), cpu224 or all")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--stem", choices=["small", "imagenet"])
    p.add_argument("--steps", type=int, help=f"timed steps per run (default {DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first (default {DEFAULTS['warmup']})")
    p.add_argument(
        "--repeats", type=int, help=f"rounds over the configurations (default {DEFAULTS['repeats']})"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["32", "bf16", "16"], default="32", help="16 and bf16: autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: available cores)")
    p.add_argument(
        "--malloc", choices=accel.MALLOC_POLICIES, default="auto",
        help="CPU allocator policy of the timed runs, as trainer.malloc (default auto: jemalloc, which "
        "python -m xnorpp.bench preloads where it is installed, else keep)",
    )  # fmt: skip
    p.add_argument(
        "--kernels", choices=accel.KERNEL_MODES, default="compiled",
        help="the binary layers' sign kernel, as trainer.kernels (default compiled)",
    )  # fmt: skip
    p.add_argument(
        "--no-int8-conv", dest="int8_conv", action="store_false",
        help="binary forward convs in fp32 instead of exact int8 on CPU, as trainer.int8_conv=false",
    )  # fmt: skip
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS))
    p.add_argument(
        "--in-process", action="store_true", help="no worker processes (CPU peaks then unreliable)"
    )
    p.add_argument(
        "--no-memory-pass", dest="memory_pass", action="store_false",
        help="skip the live-peak/saved-bytes pass (one more process per configuration)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def _settings(args: argparse.Namespace, preset: str | None) -> dict[str, Any]:
    settings = {**DEFAULTS, **(PRESETS[preset] if preset else {})}
    for key in ("image_size", "batch_size", "num_classes", "stem", "steps", "warmup", "repeats"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings.update(
        preset=preset, device=args.device, precision=args.precision, channels_last=args.channels_last,
        compile=args.compile, threads=args.threads or available_cores(), in_process=args.in_process,
        **accel.describe_malloc(args.malloc), kernels=args.kernels,
        int8_conv=args.int8_conv, memory_pass=args.memory_pass,
    )  # fmt: skip
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark: print markdown tables, return (and with ``--json`` write) the results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.malloc == "jemalloc":  # the workers inherit this process's preloaded allocator
        try:
            accel.apply_malloc("jemalloc")
        except ValueError as e:
            parser.error(str(e))
    presets: list[str | None] = list(PRESETS) if args.preset == "all" else [args.preset]
    out: dict[str, Any] = {"torch": torch.__version__, "results": []}
    start = time.perf_counter()
    for preset in presets:
        settings = _settings(args, preset)
        print(f"benchmarking {preset or 'custom'}: {settings}", file=sys.stderr, flush=True)
        result = bench_setting(settings, args.configs, lambda s: print(s, file=sys.stderr, flush=True))
        out["results"].append(result)
        print(format_table(result) + "\n", flush=True)
    out["wall_s"] = time.perf_counter() - start
    print(f"total {out['wall_s']:.0f} s", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_nan_to_none(out), indent=2))
    return out


def _nan_to_none(obj: Any) -> Any:
    """JSON has no NaN: unmeasured numbers become ``null``."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


if __name__ == "__main__":
    if sys.argv[1:2] == ["loader"]:
        from xnorpp.bench_loader import main as _loader_main

        _loader_main(sys.argv[2:])
        sys.exit(0)
    # as train.py: jemalloc preloaded where installed (the workers inherit it), unless asked for glibc
    accel.preload_allocator(
        "xnorpp.bench", keep_glibc=lambda: build_parser().parse_args().malloc in ("keep", "system")
    )
    from xnorpp.bench import main as _main  # the importable module, so that workers unpickle its functions

    _main()
