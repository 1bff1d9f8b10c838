"""Read the metric history of an offline W&B run (`wandb/offline-run-*/run-*.wandb`) without a server.

The .wandb file is a LevelDB-style log (32 KiB blocks, 7-byte record headers) of protobuf `Record`s;
wandb itself offers no public reader in this release (and offline runs do not reliably carry a
wandb-summary.json), so the report and the tests use this one. Only history rows are decoded.
"""

from __future__ import annotations

import glob
import json
import os
import struct

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(buf: bytes):
    if buf[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, acc = _HEADER, b""
    while pos + _HEADER <= len(buf):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + _HEADER])
        pos += _HEADER
        data = buf[pos : pos + length]
        pos += length
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            acc = data
        elif kind == _MIDDLE:
            acc += data
        elif kind == _LAST:
            yield acc + data
            acc = b""


def read_history(path: str) -> dict[str, list]:
    """Metric name -> logged values in order, from a .wandb file or an offline-run-* folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    if os.path.isdir(path):
        files = glob.glob(os.path.join(path, "run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"no run-*.wandb in {path}")
        path = files[0]
    with open(path, "rb") as f:
        buf = f.read()
    series: dict[str, list] = {}
    for data in _records(buf):
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") != "history":
            continue
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            series.setdefault(key, []).append(json.loads(item.value_json))
    return series


def offline_runs(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))
