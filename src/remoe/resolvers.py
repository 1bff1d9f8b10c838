"""The config resolvers, the routing methods' knob defaults and run-mode defaults train.py needs before Hydra
composes anything: kept free of torch and Lightning imports so that `train.py --help` starts in about a second
(train/spec.py imports the rest)."""

from __future__ import annotations

import hashlib
import re
import sys

from omegaconf import DictConfig, OmegaConf, open_dict

from .model.knobs import register_knob_configs


def slug(overrides: str | None) -> str:
    """Folder name for a run from Hydra's override_dirname: readable, filesystem-safe, bounded."""
    s = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", overrides or "") or "default"
    if len(s) > 96:
        s = s[:80] + "-" + hashlib.sha1(s.encode()).hexdigest()[:10]
    return s


def grid_slug(excluded=(), task_overrides=None) -> str:
    """Folder name of a -m grid from its command-line overrides but the `excluded` keys (conf/config.yaml
    passes hydra.job.config.override_dirname.exclude_keys: the one list for run and grid folder names);
    sweeps included; default: this process's command line, as Hydra's own sweep-dir resolution has no
    ${hydra:} access yet. The same command lands in the same folder, so rerunning it skips completed points
    and resumes cut ones."""

    if task_overrides is None:
        task_overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    items = []
    for o in task_overrides:
        key, _, value = str(o).lstrip("+~").partition("=")
        if key not in set(excluded) and not key.startswith("hydra."):
            items.append(f"{key}-{value}")
    # no commas: a path holding one cannot be passed back as an override (checkpoint=...) without quoting
    return slug("__".join(sorted(items)).replace(",", "+"))


def register_resolvers() -> None:
    """Everything conf/ needs from Python: the ${remoe_*:} resolvers and each routing method's knobs
    (ConfigStore group _knobs, included by conf/model/<name>.yaml)."""
    register_knob_configs()
    if not OmegaConf.has_resolver("remoe_slug"):
        OmegaConf.register_new_resolver("remoe_slug", slug)
    if not OmegaConf.has_resolver("remoe_grid"):
        OmegaConf.register_new_resolver("remoe_grid", grid_slug)


def run_mode_defaults(cfg: DictConfig, multirun: bool) -> None:
    """resume / skip_completed left at null: true in a -m grid (rerunning the command skips completed points
    and resumes cut ones), false for a single run."""
    with open_dict(cfg):
        for key in ("resume", "skip_completed"):
            if cfg.get(key) is None:
                cfg[key] = multirun
