"""Two runs of one setting side by side: `python src/report.py --compare RUN_A RUN_B [--windows 0-99,100-999]`.

What a study that trains a run again asks of the pair (reports/machine_check: the same commit on another CPU;
reports/lambda_floor: a change that should not matter until it does): do they share their provenance, at which
step do their training series part, how far apart are they over each window of steps, how did the routing
controller move where the method has one (λ, sparsity against its target), and where did they end. Reads
run folders or kept records (metrics.csv or metrics.csv.xz), writes nothing.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from ..cli import UsageError
from ..model import LAMBDA_FLOOR
from ..train.record import read_summary
from .collect import read_metrics

PROVENANCE = ("git_commit", "seed", "precision", "versions")  # what a pair of one setting shares
OUTCOME = ("sparsity", "layer_sparsity", "lambda", "settling_step", "collapsed_layers")  # besides val_loss
SERIES = ("train/loss", "train/lambda", "train/sparsity")


def parse_windows(text: str) -> list[tuple[int, int]]:
    """`0-99,100-999` -> [(0, 99), (100, 999)] (inclusive steps); a UsageError naming --windows otherwise."""
    out = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
            raise UsageError(f"--windows: {part.strip()!r} is not FIRST-LAST (steps, FIRST <= LAST)")
        out.append((int(lo), int(hi)))
    return out


def default_windows(steps: int) -> list[tuple[int, int]]:
    """The first 100 steps, then the run's quarters: 0-99, 100-999, 1000-1999, ... for 4,000 steps."""
    edges = sorted({0, min(100, steps), *(steps * i // 4 for i in (1, 2, 3)), steps})
    return [(lo, hi - 1) for lo, hi in zip(edges, edges[1:], strict=False) if hi > lo]


def _load(run_dir: str) -> tuple[dict, pd.DataFrame]:
    """(summary.json, the per-step training series indexed by step) of a run folder or kept record."""
    if not os.path.isdir(run_dir):
        raise UsageError(f"--compare: no such folder {run_dir!r}")
    summary, metrics = read_summary(run_dir), read_metrics(run_dir)
    if summary is None or metrics is None or "train/loss" not in metrics:
        raise UsageError(f"--compare: {run_dir!r} holds no run record (summary.json and metrics.csv with train/loss)")
    rows = metrics[metrics["train/loss"].notna()]
    return summary, rows[["step", *(c for c in SERIES if c in rows)]].drop_duplicates("step", keep="last").set_index("step")


def _first_difference(a: pd.DataFrame, b: pd.DataFrame, columns: list[str]) -> tuple[int | None, int | None]:
    """(last step through which `columns` are bitwise equal, the first step where they differ; None if none)."""
    steps = a.index.intersection(b.index)
    same = np.ones(len(steps), dtype=bool)
    for c in columns:
        same &= a.loc[steps, c].to_numpy() == b.loc[steps, c].to_numpy()
    if same.all():
        return (int(steps.max()) if len(steps) else None), None
    i = int(np.argmin(same))
    return (int(steps[i - 1]) if i else None), int(steps[i])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def compare_runs(run_a: str, run_b: str, windows: list[tuple[int, int]] | None = None) -> list[str]:
    """The comparison as lines of text (the first run is "first", the second "second")."""
    (ja, ta), (jb, tb) = _load(run_a), _load(run_b)
    cpu = [f"{(j.get('cpu') or {}).get('model')} {(j.get('cpu') or {}).get('flags')}" for j in (ja, jb)]
    differ = [k for k in PROVENANCE if ja.get(k) != jb.get(k)]
    lines = [f"runs: {run_a} | {run_b}", f"machines: {cpu[0]} | {cpu[1]}",
             "same " + (", ".join(k for k in PROVENANCE if k not in differ) or "nothing")
             + (f"; different {', '.join(differ)}" if differ else "")]
    through, first = _first_difference(ta, tb, ["train/loss"])
    lines.append(f"train loss identical through step {through}, first difference at {first}")
    controlled = "train/lambda" in ta and "train/lambda" in tb
    if controlled:
        through, first = _first_difference(ta, tb, ["train/loss", "train/lambda"])
        lines.append(f"train loss and λ identical through step {through}, first difference at {first}")
        for name, t in (("first", ta), ("second", tb)):
            at = t.index[t["train/lambda"] <= LAMBDA_FLOOR]
            lines.append(f"{name}: {len(at)} steps with λ at or below the floor {LAMBDA_FLOOR:.3g}"
                         + (f" (steps {at.min()}-{at.max()})" if len(at) else ""))
    target = ja.get("target_sparsity")
    steps = ta.index.intersection(tb.index)
    for lo, hi in windows or default_windows(int(steps.max()) + 1 if len(steps) else 0):
        w = steps[(steps >= lo) & (steps <= hi)]
        if not len(w):
            continue
        d = (ta.loc[w, "train/loss"] - tb.loc[w, "train/loss"]).abs()
        text = (f"steps {lo}-{hi}: |Δ train loss| median {d.median():.2e}, max {d.max():.2e}; mean train loss "
                f"{ta.loc[w, 'train/loss'].mean():.4f} vs {tb.loc[w, 'train/loss'].mean():.4f}")
        if controlled and "train/sparsity" in ta and "train/sparsity" in tb:
            s = [t.loc[w, "train/sparsity"] for t in (ta, tb)]
            lam = [t.loc[w, "train/lambda"] for t in (ta, tb)]
            below = f" (below target {(s[0] < target).mean():.2f} vs {(s[1] < target).mean():.2f})" if target else ""
            text += (f"; sparsity {s[0].mean():.4f} vs {s[1].mean():.4f}{below}; λ median {lam[0].median():.3g} vs "
                     f"{lam[1].median():.3g}, max {lam[0].max():.3g} vs {lam[1].max():.3g}")
        lines.append(text)
    va, vb = ja.get("val_loss"), jb.get("val_loss")
    if va is not None and vb is not None:
        lines.append(f"val loss {va:.4f} vs {vb:.4f} (Δ {vb - va:+.4f})")
    lines += [f"{k} {_fmt(ja.get(k))} vs {_fmt(jb.get(k))}" for k in OUTCOME
              if ja.get(k) is not None or jb.get(k) is not None]
    da, db = ja.get("downstream") or {}, jb.get("downstream") or {}
    lines += [f"{t} acc {_fmt(da[t].get('acc'))} vs {_fmt(db[t].get('acc'))}" for t in sorted(set(da) & set(db))]
    return lines
