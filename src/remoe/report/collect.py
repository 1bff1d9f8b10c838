"""Gather run directories (single runs, multirun folders) into one frame; skip broken ones loudly."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..runs import SUMMARY

log = logging.getLogger("remoe.report")
KEYS = ["model", "size", "experts", "topk", "granularity", "seed", "val_loss", "steps", "train_tokens"]


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
    row = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    for task, metrics in (summary.get("downstream") or {}).items():
        for metric, value in metrics.items():
            row[f"ds:{task}:{metric}"] = value
    return row


CONFIG_FIELDS = {"regularizer": "relu", "lambda0": "relu", "alpha": "relu", "aux_loss_coef": "topk", "ffn_mult": None}


def _fill_from_config(row: dict, run_dir: str) -> None:
    """Runs recorded before a summary field existed: take the method settings from config_resolved.yaml."""
    missing = [k for k in CONFIG_FIELDS if k not in row]
    path = os.path.join(run_dir, "config_resolved.yaml")
    if not missing or not os.path.exists(path):
        return
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(OmegaConf.load(path).model)
    router = {"dense": None, "topk": "topk", "remoe": "relu"}.get(row.get("model"))
    defaults = {"ffn_mult": 1, "regularizer": "lb_l1", "lambda0": 1e-8, "alpha": 1.2, "aux_loss_coef": 1e-2}
    for k in missing:
        if CONFIG_FIELDS[k] in (None, router):
            row[k] = model.get(k, defaults[k])


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
            elif missing := [k for k in KEYS if k not in s]:
                reason = f"summary.json lacks {missing}"
        except FileNotFoundError:
            reason = "incomplete: no summary.json"
        except (OSError, ValueError) as e:
            reason = f"corrupt summary.json ({type(e).__name__})"
        if reason:
            log.warning("report: skipping %s: %s", d, reason)
            skipped.append((d, reason))
            continue
        row = _flatten(s)
        row["run_dir"] = d
        _fill_from_config(row, d)
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["model", "size", "experts", "granularity", "seed", "run_dir"], na_position="first",
                            kind="mergesort").reset_index(drop=True)
    return Collection(df, skipped)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


INACTIVE = 1 / 64  # experts routed fewer than this share of tokens count as inactive (paper, Fig. 8)


def routing_share(run_dir: str):
    """(layers, experts) share of each layer's routed tokens per expert over the second half of training
    (routing.jsonl), or None when the run logged none."""
    recs = read_jsonl(os.path.join(run_dir, "routing.jsonl"))
    if not recs:
        return None
    counts = np.sum([r["counts"] for r in recs[len(recs) // 2 :]], axis=0).astype(float)
    return counts / counts.sum(axis=1, keepdims=True).clip(min=1)


def read_analysis(run_dir: str) -> dict | None:
    """The run's routing_analysis.json (written at the end of training), or None."""
    p = os.path.join(run_dir, "routing_analysis.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def read_metrics(run_dir: str) -> pd.DataFrame | None:
    path = os.path.join(run_dir, "metrics.csv")
    return pd.read_csv(path) if os.path.exists(path) else None
