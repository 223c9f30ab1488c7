"""Checkpoints: atomic writes, rotation, newest-valid discovery, and full random-state capture.

A checkpoint is a ``torch.save`` of tensors and plain containers only (the config travels as YAML
text), so it loads with ``torch.load(weights_only=True)``. Writes go to a temporary file in the same
directory, are flushed and fsynced, then renamed over the target: a crash leaves the previous file.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "capture_rng",
    "find_resumable",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used."""


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) random states as tensors and plain values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_path(path: Path) -> Path:
    """Where :func:`save_checkpoint` writes ``path`` before renaming it (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, flush, fsync, rename, fsync the directory).

    On any failure the temporary file is removed, the previous file at ``path`` is untouched, and a
    :class:`CheckpointError` names the path and the free space. (A full disk surfaces as an ``OSError``
    from a write or as a ``RuntimeError`` from ``torch.save``'s zip writer, "unexpected pos".)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if os.name == "posix":  # make the rename durable (a directory cannot be opened on Windows)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except Exception as e:
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < 1 << 20
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(
            f"could not write checkpoint {path} ({type(e).__name__}: {e}); {free / 2**20:.1f} MiB free on its "
            f"filesystem{' - the disk is full: free space or move the run directory (hydra.run.dir)' if full else ''}"
            f"; the previous checkpoint is intact"
        ) from e
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a :class:`CheckpointError` names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign object: all unusable
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} holds no 'model' state: not an xnorpp checkpoint")
    return state


def _progress(path: Path) -> tuple[int, int]:
    """``(global_step, epoch)`` stored in a checkpoint, read without loading its tensors (memory-mapped);
    a :class:`CheckpointError` if it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state"]
        return int(state["global_step"]), int(state["epoch"])
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {type(e).__name__}: {e}") from e


def find_resumable(ckpt_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint in ``ckpt_dir`` furthest into training that loads, whatever its name (``best.pt``
    aside): the highest global step, then the later epoch (``last.pt`` ends the epoch a step checkpoint of
    the same step is in), then the newer file. Unreadable ones are skipped with a warning."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    ranked: list[tuple[tuple[int, int, float], Path]] = []
    for p in ckpt_dir.glob("*.pt"):
        if p.name == "best.pt" or p.name.startswith("."):
            continue
        try:
            ranked.append(((*_progress(p), p.stat().st_mtime), p))
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
    for _, p in sorted(ranked, key=lambda kp: kp[0], reverse=True):
        try:
            return p, load_checkpoint(p)
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
    return None


def rotate(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints; returns the deleted paths."""
    if keep <= 0:
        return []
    steps = [p for p in Path(ckpt_dir).glob("step_*.pt") if _STEP_RE.match(p.name)]
    old = sorted(steps, key=lambda p: int(_STEP_RE.match(p.name).group(1)), reverse=True)[keep:]
    for p in old:
        p.unlink(missing_ok=True)
    return old
