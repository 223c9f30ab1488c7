"""Train-step benchmark of ``resnet18_preact_bin`` against a real-valued floor and a naive binary net.

``python -m xnorpp.bench --preset all`` times one SGD training step (forward, backward,
``optimizer.step``) on random data for each configuration:

- ``floor``: the same architecture with ``binarization="fp"`` (everything real): the speed and memory a
  binary network should not fall far below / rise far above;
- ``xnorpp``: ``full_binary`` with the learned rank-1 ``Gamma`` as the library builds it (the fused
  sign-conv-Gamma node of :mod:`xnorpp.nn.fused`);
- ``naive``: the same math written the plain way, built here by swapping modules: a sign autograd
  Function that saves its fp32 input (backward ``grad * (|x| <= 1)``), the same binary weights, and the
  three rank-1 factors multiplied one after another onto the activation (``y * alpha * beta * gamma``);
- ``unfused`` (opt-in via ``--configs``): the library with ``fused = False`` (bool STE mask + fp32
  ``+-1`` conv input + fp32 ``y`` saved).

Measurements (each run builds its model in a fresh process; runs of the configurations are interleaved
within each of ``--repeats`` rounds, alternating the order; numbers are medians over the rounds):

- img/s: ``batch / median step time`` over ``--steps`` timed steps after ``--warmup`` steps;
- peak RSS MB (CPU): ``ru_maxrss`` after the timed steps minus the resident set (``/proc/self/statm``)
  just before the first step, model, optimizer and batch already built. ``ru_maxrss`` is a per-process
  high-water mark, hence one process per run; the processes are forked from a ``forkserver`` that has
  imported torch. With glibc's default ``malloc`` this includes freed heap memory that is not handed
  back to the OS (fragmentation), which depends on the allocation pattern as much as on the model;
- live peak MB (CPU, Linux/glibc, first round, worker processes only): after the timed steps, glibc
  is told to serve every block of 1 MiB or more with its own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``)
  and to return free memory (``malloc_trim``), the high-water mark is reset
  (``/proc/self/clear_refs``), and one more step is measured the same way: the peak of the memory
  actually allocated during a step;
- on CUDA both peaks are ``max_memory_allocated`` minus ``memory_allocated`` before the first step;
- saved MB (first round, during that same extra step): bytes of the tensors autograd saves in one
  training forward (``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters and
  buffers excluded): exact and deterministic, a companion of the noisy peaks;
- ratios ``X / floor`` and ``X / naive``: medians over the rounds of the per-round ratios (the runs of a
  round are back to back, so the machine's load affects both sides of a ratio alike).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import BinaryConv2d, LearnedScale, ScaleFactor
from .nn.fused import set_fused

__all__ = [
    "CONFIGS",
    "PRESETS",
    "TARGETS",
    "NaiveRank1Scale",
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
DEFAULTS: dict[str, Any] = {"steps": 2, "warmup": 1, "repeats": 3, **PRESETS["cpu32"]}
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
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


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


@contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


def _release_heap_and_reset_peak() -> bool:
    """glibc: big blocks via ``mmap`` from now on, free heap returned, peak RSS reset; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20) == 1
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM, which ru_maxrss reports)
        return ok
    except (OSError, AttributeError):
        return False


def run_config(
    name: str,
    image_size: int,
    batch_size: int,
    steps: int,
    warmup: int,
    num_classes: int = 10,
    stem: str = "small",
    device: str = "cpu",
    precision: str = "32",
    channels_last: bool = False,
    compile: bool = False,
    measure_live_peak: bool = False,
    measure_saved: bool = False,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build configuration ``name``, time ``steps`` SGD train steps, measure memory; one result dict.

    Run it in a fresh process (:func:`run_isolated`) for meaningful CPU peaks (module docstring).
    """
    start = time.perf_counter()
    with _threads(threads or available_cores()):
        torch.manual_seed(seed)
        dev = torch.device(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = build_config(name, image_size, num_classes, stem).to(dev, memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(dev.type, enabled=precision == "16")
        x = torch.randn(batch_size, 3, image_size, image_size, device=dev).contiguous(memory_format=fmt)
        target = torch.randint(0, num_classes, (batch_size,), device=dev)
        forward: Callable[[Tensor], Tensor] = torch.compile(model) if compile else model
        cuda = dev.type == "cuda"

        def loss_fn() -> Tensor:
            with _autocast(dev.type, precision):
                return F.cross_entropy(forward(x), target)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss_fn()).backward()
            scaler.step(opt)
            scaler.update()
            if cuda:
                torch.cuda.synchronize(dev)

        def base_memory() -> int:
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                return torch.cuda.memory_allocated(dev)
            return _rss_bytes()

        def peak_memory(base: int) -> float:
            return ((torch.cuda.max_memory_allocated(dev) if cuda else _maxrss_bytes()) - base) / MB

        base = base_memory()
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        result: dict[str, Any] = {
            "config": name,
            "step_s": times,
            "img_s": batch_size / statistics.median(times) if times else float("nan"),
            "peak_rss_mb": peak_memory(base),
            "live_peak_mb": float("nan"),
            "saved_mb": float("nan"),
        }
        if measure_live_peak or measure_saved:  # one more step, watched by the allocator and/or autograd
            opt.zero_grad(set_to_none=True)
            live = measure_live_peak and (cuda or _release_heap_and_reset_peak())
            base = base_memory()
            if measure_saved:
                saved = saved_tensor_bytes(step, [*model.parameters(), *model.buffers()])
            else:
                step()
            if live:
                result["live_peak_mb"] = peak_memory(base)
            if measure_saved:
                result["saved_mb"] = saved.pop("total") / MB
                result["saved_mb_by_dtype"] = {k: v / MB for k, v in saved.items()}
        result["run_s"] = time.perf_counter() - start
        return result


def _worker(kwargs: dict[str, Any], conn: Connection) -> None:
    try:
        conn.send(("ok", run_config(**kwargs)))
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


def run_isolated(kwargs: dict[str, Any], ctx: BaseContext | None = None) -> dict[str, Any]:
    """:func:`run_config` in a new process, so that its ``ru_maxrss`` covers this run only."""
    ctx = ctx or _mp_context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(kwargs, send))
    proc.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        status, payload = "error", "the worker process died (out of memory?)"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark run {kwargs['name']!r} failed (exit code {proc.exitcode}): {payload}")
    return payload


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN (unmeasured)
    return statistics.median(values) if values else float("nan")


WORKER_KEYS: tuple[str, ...] = (
    "image_size", "batch_size", "steps", "warmup", "num_classes", "stem", "device", "precision",
    "channels_last", "compile", "threads",
)  # fmt: skip


def bench_setting(
    settings: dict[str, Any], configs: Sequence[str], log: Callable[[str], None] = print
) -> dict[str, Any]:
    """All rounds of one setting (configurations interleaved within each round); a summary dict."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    ctx = None if settings["in_process"] else _mp_context()
    for rnd in range(settings["repeats"]):
        for name in configs if rnd % 2 == 0 else list(reversed(configs)):
            first = rnd == 0
            kwargs = {"name": name, **{k: settings[k] for k in WORKER_KEYS}}
            kwargs.update(measure_live_peak=first and ctx is not None, measure_saved=first)
            res = run_config(**kwargs) if ctx is None else run_isolated(kwargs, ctx)
            runs[name].append(res)
            log(
                f"  round {rnd + 1}/{settings['repeats']} {name:8s} {res['img_s']:8.2f} img/s  peak RSS "
                f"{res['peak_rss_mb']:6.0f} MB  live peak {res['live_peak_mb']:6.0f} MB  saved {res['saved_mb']:6.0f} MB"
            )
    summary = {
        name: {
            **{m: _median([r.get(m, float("nan")) for r in rs]) for m in METRICS},
            "img_s_rounds": [r["img_s"] for r in rs],
            "peak_rss_mb_rounds": [r["peak_rss_mb"] for r in rs],
            "saved_mb_by_dtype": rs[0].get("saved_mb_by_dtype", {}),
        }
        for name, rs in runs.items()
    }
    ratios: dict[str, dict[str, float]] = {}
    for name in configs:
        ratios[name] = {}
        for ref in ("floor", "naive"):
            if ref == name or ref not in runs:
                continue
            for m in METRICS:
                key = f"{m.removesuffix('_mb')}_vs_{ref}"
                per_round = [
                    a[m] / b[m] for a, b in zip(runs[name], runs[ref]) if m in a and m in b and b[m] > 0
                ]
                ratios[name][key] = _median(per_round)
    targets = {}
    for key, op, bound in TARGETS:
        value = ratios.get("xnorpp", {}).get(key, float("nan"))
        if value == value:
            met = value >= bound if op == ">=" else value <= bound
            targets[key] = {"target": f"{op} {bound}", "value": value, "met": met}
    return {"settings": settings, "configs": summary, "ratios": ratios, "targets": targets}


def _fmt(value: float, digits: int) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown report of one :func:`bench_setting` result: a table and the targets."""
    s = result["settings"]
    head = (
        f"### resnet18_preact_bin {s['image_size']}x{s['image_size']}, batch {s['batch_size']}, "
        f"{s['device']}, precision {s['precision']}{', channels_last' if s['channels_last'] else ''}"
        f"{', compiled' if s['compile'] else ''}, {s['threads']} threads: {s['steps']} timed steps after "
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
        "| config | img/s | peak RSS MB | live peak MB | saved MB | "
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
        f"- xnorpp {key}: {t['value']:.2f} (target {t['target']}): {'met' if t['met'] else 'NOT met'}"
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
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS))
    p.add_argument(
        "--in-process", action="store_true", help="no worker processes (CPU peaks then unreliable)"
    )
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
    )  # fmt: skip
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark: print markdown tables, return (and with ``--json`` write) the results."""
    args = build_parser().parse_args(argv)
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
    from xnorpp.bench import main as _main  # the importable module, so that workers unpickle its functions

    _main()
