"""Input-pipeline benchmark: ``python -m xnorpp.bench loader DATA_ROOT [--workers N] [--json PATH]``.

Measures the training pipeline's images/s on the JPEGs under ``DATA_ROOT`` (a class-per-folder tree, or
``train/`` + ``val/``; ``--make N`` first writes ``N`` photo-like 500 x 375 JPEGs there,
:mod:`xnorpp.data.photos`) for each backend that can run here (:data:`~xnorpp.data.pipeline.PIPELINES`)
next to the original torchvision pipeline (``reference``, i.e. ``pil``), on the same files, same seeds,
in the same run. The ImageNet recipe at 224 px: random-resized crop (8-100% of the area), flip, colour
jitter 0.4, normalisation.

- ``img_per_s_per_worker``: what one DataLoader worker produces: the dataset's samples and their collation
  into batches, in this process with one torch thread (a split backend's worker half only), per second
  of this process's CPU time (``..._wall``: per wall-clock second, which other processes on a shared
  machine lower);
- ``img_per_s``: the whole pipeline with ``--workers`` DataLoader workers, batches through the device half
  on ``--device`` (for split backends; on CPU that work runs in this process, as in training);
- ``device_img_per_s``: the device half alone on a batch already in memory (split backends).

Backends and the reference alternate within each of ``--repeats`` rounds (the machine's load changes as it
goes); the numbers are medians over the rounds, with every round's value under ``rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data._utils.collate import default_collate

from .data import build_datasets
from .data.decode import region_decoder_reason
from .data.photos import make_photo_tree
from .data.pipeline import PIPELINES, DeviceLoader, Pipeline, build_pipeline
from .engine.loaders import SeededDataset, worker_context

__all__ = ["build_parser", "main", "measure"]


def _per_worker(dataset: Dataset, count: int, batch_size: int) -> tuple[float, float]:
    """Images per CPU second and per wall-clock second of one worker's job: ``count`` samples and their
    collation, one thread (the CPU time is what other processes on a shared machine do not change)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for first in range(0, count, batch_size):
        default_collate([dataset[i] for i in range(first, min(count, first + batch_size))])
    return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def _through_loader(
    dataset: Dataset,
    count: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    pipeline: Pipeline | None,
) -> float:
    """Images/s of the whole pipeline: ``workers`` DataLoader workers, then the device half."""
    loader: Any = DataLoader(
        Subset(dataset, range(count)), batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
        multiprocessing_context=worker_context(workers),
    )  # fmt: skip
    if pipeline is not None and pipeline.train_batch is not None:
        loader = DeviceLoader(loader, device, pipeline.train_batch)
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        if isinstance(images, torch.Tensor) and images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        seen += len(_)
    return seen / (time.perf_counter() - start)


def _device_only(
    pipeline: Pipeline, dataset: Dataset, batch_size: int, device: torch.device, rounds: int = 5
) -> float:
    assert pipeline.train_batch is not None
    batch = default_collate([dataset[i] for i in range(batch_size)])[0]
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        pipeline.train_batch(batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times[1:])


def measure(
    root: str | Path,
    *,
    backends: Sequence[str] | None = None,
    workers: int = 2,
    images: int = 256,
    batch_size: int = 32,
    repeats: int = 3,
    device: str = "cpu",
    log: Any = None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns ``{backend: numbers, "reference": numbers,
    "settings": ...}``."""
    dev = torch.device(device)
    train, val, _ = build_datasets(
        "imagefolder", root=root, image_size=224, augment="imagenet", crop_pct=0.875
    )
    count = min(images, len(train))  # type: ignore[arg-type]
    if backends is None:
        backends = [n for n, s in PIPELINES.items() if n != "pil" and s.missing(dev) is None]
    pipelines = {"reference": None, **{b: build_pipeline(b, train, val, dev) for b in backends}}
    datasets = {name: SeededDataset(train if p is None else p.train, seed=0) for name, p in pipelines.items()}
    keys = ("img_per_s_per_worker", "img_per_s_per_worker_wall", "img_per_s")
    rounds: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in pipelines}
    threads = torch.get_num_threads()
    for r in range(repeats):
        order = list(pipelines) if r % 2 == 0 else list(reversed(pipelines))
        for name in order:
            torch.set_num_threads(1)
            per_worker, per_worker_wall = _per_worker(datasets[name], count, batch_size)
            torch.set_num_threads(threads)
            total = _through_loader(datasets[name], count, batch_size, workers, dev, pipelines[name])
            for key, value in zip(keys, (per_worker, per_worker_wall, total), strict=True):
                rounds[name][key].append(value)
            if log is not None:
                log(
                    f"round {r + 1}/{repeats} {name}: {per_worker:.0f} img/s per worker, {total:.0f} img/s with {workers} workers"
                )
    out: dict[str, Any] = {}
    for name, values in rounds.items():
        out[name] = {key: statistics.median(v) for key, v in values.items()}
        out[name]["rounds"] = values
        pipeline = pipelines[name]
        if pipeline is not None and pipeline.train_batch is not None:
            out[name]["device_img_per_s"] = _device_only(pipeline, datasets[name], batch_size, dev)
    ref = out["reference"]["img_per_s_per_worker"]
    for name in backends:
        out[name]["per_worker_vs_reference"] = out[name]["img_per_s_per_worker"] / ref
    out["settings"] = {
        "root": str(root), "images": count, "batch_size": batch_size, "workers": workers, "repeats": repeats,
        "device": str(dev), "torch": torch.__version__, "region_decoder": region_decoder_reason() or "libjpeg-turbo",
        "load_average": list(os.getloadavg()), "cpus": os.cpu_count(),
    }  # fmt: skip
    return out


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of :func:`measure`'s result."""
    s = result["settings"]
    head = (
        f"{s['images']} images, batch {s['batch_size']}, {s['workers']} workers, device {s['device']}, "
        f"load average {', '.join(f'{v:.2f}' for v in s['load_average'])} on {s['cpus']} CPUs\n\n"
        "| pipeline | img/s per worker | vs reference | img/s, all workers | device half img/s |\n"
        "|---|---:|---:|---:|---:|\n"
    )
    rows = []
    for name, r in result.items():
        if name == "settings":
            continue
        ratio = f"{r['per_worker_vs_reference']:.2f}x" if "per_worker_vs_reference" in r else "1.00x"
        device = f"{r['device_img_per_s']:.0f}" if "device_img_per_s" in r else "-"
        rows.append(
            f"| {name} | {r['img_per_s_per_worker']:.0f} | {ratio} | {r['img_per_s']:.0f} | {device} |"
        )
    return head + "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m xnorpp.bench loader``."""
    p = argparse.ArgumentParser(
        prog="python -m xnorpp.bench loader", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("root", type=Path, metavar="DATA_ROOT", help="a folder of JPEGs in class folders")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for img_per_s (default 2)")
    p.add_argument("--images", type=int, default=256, help="images per measurement (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="rounds over the pipelines (default 3)")
    p.add_argument("--device", default="cpu", help="where the device half runs (default cpu)")
    p.add_argument("--backends", nargs="+", choices=[n for n in PIPELINES if n != "pil"], default=None,
                   help="default: every backend that can run on --device")  # fmt: skip
    p.add_argument(
        "--make", type=int, default=0, metavar="N", help="first write N photo-like JPEGs to DATA_ROOT"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark: print a markdown table, return (and with ``--json`` write) the results."""
    args = build_parser().parse_args(argv)
    if args.make:
        make_photo_tree(args.root, args.make, val=2)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    result = measure(
        args.root, backends=args.backends, workers=args.workers, images=args.images, batch_size=args.batch_size,
        repeats=args.repeats, device=args.device, log=lambda m: print(m, file=sys.stderr, flush=True),
    )  # fmt: skip
    print(format_table(result), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
