"""``xnorpp.track.wandb_file`` on run files written here in wandb's log format (blocks, chunks, padding).

The reader on files wandb itself wrote is tested with real runs in test_dashboard.py and test_sweep.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from xnorpp.track.wandb_file import BLOCK, HEADER, history_rows, read_records, run_files


def _log_file(records: list[pb.Record], padded: list[int] | None = None) -> bytes:
    """wandb's layout: header, then each record in chunks that never cross a 32 KiB block boundary;
    ``padded`` collects the offsets where a block ended in zero padding."""
    out = bytearray(b":W&B\xe1\xbe\x00")
    for record in records:
        data, first = record.SerializeToString(), True
        while True:
            left = BLOCK - len(out) % BLOCK
            if left < HEADER:
                if padded is not None:
                    padded.append(len(out))
                out += b"\0" * left
                continue
            n = min(len(data), left - HEADER)
            last = n == len(data)
            kind = (1 if last else 2) if first else (4 if last else 3)
            out += b"\0\0\0\0" + n.to_bytes(2, "little") + bytes([kind]) + data[:n]
            data, first = data[n:], False
            if last:
                break
    return bytes(out)


def _history(**items: str) -> pb.Record:
    record = pb.Record()
    for key, value_json in items.items():
        record.history.item.add(key=key.replace("__", "/"), value_json=value_json)
    return record


def _sized(size: int) -> pb.Record:
    """A history record whose serialized size is exactly ``size`` bytes."""
    for n in range(size, 0, -1):
        record = _history(_step="0", pad=f'"{"y" * n}"')
        if record.ByteSize() == size:
            return record
    raise AssertionError(size)


def test_records_across_blocks_and_padding(tmp_path: Path) -> None:
    first = _sized(BLOCK - 3 * HEADER + 4)  # file header + chunk header + record leave 3 bytes: padding
    big = _history(train__lr="0.1", note=f'"{"x" * 70000}"')  # one record over three blocks
    records = [first, *(_history(_step=str(i), train__lr=str(0.1 / (i + 1))) for i in range(5))]
    records.insert(3, big)
    path = tmp_path / "run-x.wandb"
    padded: list[int] = []
    data = _log_file(records, padded)
    path.write_bytes(data)
    assert padded == [BLOCK - 3] and len(data) > 3 * BLOCK
    got = read_records(path)
    assert [r.SerializeToString() for r in got] == [r.SerializeToString() for r in records]
    rows = history_rows(path)
    assert rows[0] == {"_step": 0.0}  # the text items are not numbers: left out
    assert rows[3] == {"train/lr": 0.1}
    assert rows[1] == {"_step": 0.0, "train/lr": 0.1} and rows[-1] == {"_step": 4.0, "train/lr": 0.02}


def test_a_record_still_being_written_is_left_out(tmp_path: Path) -> None:
    records = [_history(_step=str(i), train__lr="0.1") for i in range(3)]
    data = _log_file(records)
    path = tmp_path / "run-x.wandb"
    path.write_bytes(data[:-3])
    assert len(read_records(path)) == 2


def test_values_that_are_not_finite_numbers_are_skipped(tmp_path: Path) -> None:
    record = _history(a="1", b="true", c="NaN", d='{"_type": "histogram"}', e="2.5")
    record.history.item.add(nested_key=["model", "ncols"], value_json="11")
    typed = record.history.item.add(key="f")
    typed.number = 0.5
    path = tmp_path / "run-x.wandb"
    path.write_bytes(_log_file([record]))
    assert history_rows(path) == [{"a": 1.0, "e": 2.5, "model/ncols": 11.0, "f": 0.5}]


def test_not_a_wandb_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match=r"results\.json is not a wandb run file"):
        read_records(path)


def test_run_files_oldest_first_offline_and_online(tmp_path: Path) -> None:
    names = ["offline-run-20260102_000000-b", "run-20260101_000000-a", "offline-run-20260103_000000-c"]
    for name in names:
        (tmp_path / "wandb" / name).mkdir(parents=True)
        (tmp_path / "wandb" / name / f"run-{name[-1]}.wandb").write_bytes(b":W&B")
    assert [p.parent.name for p in run_files(tmp_path)] == [names[1], names[0], names[2]]
