"""Read a wandb run file (``<run dir>/wandb/offline-run-*/run-*.wandb``) offline, without a server.

The file is wandb's transaction log: a 7-byte header (``:W&B``, a 2-byte magic, a version byte), then
protobuf ``Record`` messages in 32 KiB blocks, each chunk behind a 7-byte header (4-byte checksum,
2-byte little-endian length, 1-byte type: 1 full, 2 first, 3 middle, 4 last), as in LevelDB's log
format. A block with fewer than 7 bytes left is zero padding. wandb itself has no public reader for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["history_rows", "read_records", "run_files"]

BLOCK = 32768
HEADER = 7
MAGIC = b":W&B"


def read_records(path: str | Path) -> list[Any]:
    """Every complete record of the file, in order (a record still being written is left out).

    Raises ``ValueError`` naming the file when it is not a wandb run file.
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path} is not a wandb run file (it does not start with {MAGIC!r})")
    pos, pending, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind not in (1, 2, 3, 4):  # zero fill: the rest of the block is unused
            pos += BLOCK - pos % BLOCK
            continue
        if pos + HEADER + length > len(data):  # the last record is still being written
            break
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _number(item: Any) -> float | None:
    """A history item's value if it is a finite number (histograms, tables and text are skipped)."""
    which = item.WhichOneof("value")
    if which in ("number", "integer"):
        value: Any = getattr(item, which)
    elif which is None and item.value_json:
        try:
            value = json.loads(item.value_json)
        except ValueError:
            return None
    else:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def history_rows(path: str | Path) -> list[dict[str, float]]:
    """The numeric values of each ``wandb.log`` step of the file: one dict per step, ``_step`` included."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            value = _number(item)
            if value is not None:
                row[key] = value
        rows.append(row)
    return rows


def run_files(run_dir: str | Path) -> list[Path]:
    """The wandb run files of a run directory (``wandb/offline-run-<time>-<id>`` or, online,
    ``wandb/run-<time>-<id>``), oldest first: a resumed run has one per start."""
    files = Path(run_dir).glob("wandb/*run-*/run-*.wandb")
    return sorted(files, key=lambda p: p.parent.name.removeprefix("offline-"))
