"""Gather run directories (single runs, multirun folders) into one frame; skip broken ones loudly."""

from __future__ import annotations

import json
import logging
import lzma
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..model.routing import METHODS
from ..model.stats import expert_share
from ..train.record import SUMMARY, RunSummary, open_record, record_file
from .stats import inactive_threshold

log = logging.getLogger("remoe.report")


@dataclass
class Collection:
    runs: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (run dir, reason)


def run_dirs(roots: list[str]) -> list[str]:
    """Folders that hold a summary.json or a Hydra record (a started run), sorted."""
    out = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("wandb", "checkpoints", ".hydra", "report"))
            if SUMMARY in filenames or os.path.exists(os.path.join(dirpath, ".hydra", "config.yaml")):
                out.add(os.path.abspath(dirpath))
    return sorted(out)


def _flatten(summary: dict) -> dict:
    """One frame row: scalars as they are, a list of scalars (collapsed_layers, layer_sparsity) as text,
    downstream metrics as ds:<task>:<metric> columns, the CPU's model name (and the run's torch threads, where
    recorded) as cpu_model."""
    row = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    row.update({k: " ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v)
                for k, v in summary.items()
                if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v)})
    cpu = summary.get("cpu") or {}
    row["cpu_model"] = cpu.get("model")  # the machine: its float kernels (provenance, pairing)
    if isinstance(threads := cpu.get("threads"), int) and row["cpu_model"] is not None:  # recorded since issue 40
        row["cpu_model"] = f"{row['cpu_model']}, {threads} thread{'s' if threads != 1 else ''}"
    for task, metrics in (summary.get("downstream") or {}).items():
        for metric, value in metrics.items():
            row[f"ds:{task}:{metric}"] = value
    return row


def short_path(path: str, roots: list[str]) -> str:
    """A run folder as the report names it: relative to the root it was collected from."""
    for r in roots:
        r = os.path.abspath(r)
        if path.startswith(r):
            return os.path.relpath(path, r)
    return path


def collect(roots: list[str]) -> Collection:
    rows, skipped = [], []
    for d in run_dirs(roots):
        path = os.path.join(d, SUMMARY)
        reason = None
        try:
            with open(path) as f:
                s = json.load(f)
            if not isinstance(s, dict):
                reason = "corrupt summary.json (not an object)"
            elif s.get("status") == "failed":
                reason = f"failed: {s.get('error', '?')}"
            elif s.get("status") != "completed":
                reason = f"incomplete (status {s.get('status')!r})"
            elif missing := [k for k in RunSummary.keys(required=True) if k not in s]:
                reason = f"summary.json lacks {missing}"
            else:
                reason = RunSummary.problem(s) or record_problem(d)
        except FileNotFoundError:
            reason = "incomplete: no summary.json"
        except (OSError, ValueError) as e:
            reason = f"corrupt summary.json ({type(e).__name__})"
        if reason:
            log.warning("report: skipping %s: %s", d, reason)
            skipped.append((d, reason))
            continue
        row = _flatten(RunSummary.from_json(s).to_json())  # every declared field a column (null if absent)
        row["run_dir"] = d
        rows.append(describe(row))
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["model", "size", "experts", "granularity", "seed", "run_dir"],
                            na_position="first", kind="mergesort").reset_index(drop=True)
    return Collection(df, skipped)


def describe(row: dict) -> dict:
    """A report row with off_standard and load_balanced: from the run's method (routing.METHODS) for a record
    written before summary.json held them; a method this code does not know leaves them null."""
    method = METHODS.get(row.get("model"))
    if method is None:
        return row
    if row.get("off_standard") is None:  # as _flatten writes a list: its items joined by spaces
        row["off_standard"] = " ".join(method.off_standard(row))
    if row.get("load_balanced") is None:
        row["load_balanced"] = method.load_balanced(row)
    return row


def _array(x, ndim: int) -> np.ndarray:
    """x as a finite-or-nan float array of `ndim` dimensions; ValueError otherwise."""
    a = np.asarray(x, dtype=float)
    if a.ndim != ndim:
        raise ValueError(f"{ndim}-d numbers expected")
    return a


def record_problem(run_dir: str) -> str | None:
    """Why a completed run's other record files cannot be read the way the report reads them (a cut or
    edited line, an empty metrics.csv, text where numbers belong), or None: such a run is skipped, with
    this reason in the index, instead of stopping the report."""
    def check(name: str, fn) -> str | None:
        path = record_file(run_dir, name)
        if path is None:
            return None
        try:
            fn(path)
        except (OSError, EOFError, lzma.LZMAError, ValueError, TypeError, KeyError, AttributeError,
                pd.errors.ParserError) as e:  # EOFError, LZMAError: a cut or damaged .xz
            return f"unreadable {name} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else '-'})"
        return None

    def metrics(path):
        m = pd.read_csv(path)  # EmptyDataError (a ValueError) when the file is empty
        if "step" not in m or not len(m):
            raise ValueError("no step column or no rows")
        bad = m.apply(pd.to_numeric, errors="coerce").isna() & m.notna()
        if bad.any().any():
            raise ValueError(f"text in a number column ({bad.any()[bad.any()].index[0]})")

    def routing(path):
        shapes = set()
        for r in read_jsonl(path):
            int(r["step"])
            shapes.add(_array(r["counts"], 2).shape)
        if len(shapes) > 1:
            raise ValueError("counts of different shapes")

    def flips(path):
        for r in read_jsonl(path):
            float(r["step"]), float(r["flip_rate"])

    def analysis(path):
        a = read_analysis(run_dir)
        if not isinstance(a, dict):
            raise ValueError("not a JSON object")
        if "layer_sparsity" in a:
            _array(a["layer_sparsity"], 1)
        if "token_count" in a and len(_array(a["token_count"], 1)) != len(_array(a["token_mean_active"], 1)):
            raise ValueError("token_count and token_mean_active differ in length")
        for counts in (a.get("domain_counts") or {}).values():
            _array(counts, 2)

    for name, fn in (("metrics.csv", metrics), ("routing.jsonl", routing), ("flips.jsonl", flips),
                     ("routing_analysis.json", analysis)):
        if why := check(name, fn):
            return why
    return None


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL record file (`path`, or its kept .xz copy); [] when it does not exist."""
    found = record_file(os.path.dirname(path), os.path.basename(path))
    if found is None:
        return []
    with open_record(found) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: a line that is not a JSON object")
    return rows


def second_half_routing(run_dir: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The run's routing.jsonl summed over the second half of training — (counts (L, E), tokens (L,)), the
    window every routing summary of the report reads (remoe.model.stats turns them into shares, experts per
    token, ...) — or None when the run logged none."""
    recs = read_jsonl(os.path.join(run_dir, "routing.jsonl"))
    if not recs:
        return None
    half = recs[len(recs) // 2 :]
    return np.sum([r["counts"] for r in half], axis=0), np.sum([r["tokens"] for r in half], axis=0)


def routing_share(run_dir: str):
    """(layers, experts) share of each layer's routed tokens per expert over the second half of training
    (second_half_routing), or None when the run logged none."""
    found = second_half_routing(run_dir)
    return None if found is None else expert_share(found[0])


def inactive_cells(share) -> np.ndarray:
    """(layer, expert) cells of a routing share below the inactive threshold of its expert count."""
    return share < inactive_threshold(share.shape[-1])


def inactive_experts(run_dir: str) -> int | None:
    """How many (layer, expert) cells of the run are inactive over the second half of training, or None."""
    share = routing_share(run_dir)
    return None if share is None else int(inactive_cells(share).sum())


def read_analysis(run_dir: str) -> dict | None:
    """The run's routing_analysis.json (written at the end of training), or None."""
    p = record_file(run_dir, "routing_analysis.json")
    if p is None:
        return None
    with open_record(p) as f:
        return json.load(f)


def read_metrics(run_dir: str) -> pd.DataFrame | None:
    path = record_file(run_dir, "metrics.csv")
    return pd.read_csv(path) if path else None  # a .xz one decompressed by pandas
