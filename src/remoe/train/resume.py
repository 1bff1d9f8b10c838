"""Resuming a run from its folder: which checkpoint, checked before the folder is touched (loadable, its
format, its architecture and optimizer recipe), and what the resume changes against the run's config (only the
step count and the routing method's knobs may change; the changes are recorded)."""

from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf

from ..checkpoint import CheckpointError, check_format, is_sharded, read_meta, read_sharded_metadata
from ..model import ModelConfig
from .optim import RECIPE
from .record import read_config, training_changes
from .spec import ARCH_FIELDS, ConfigError, world_size

log = logging.getLogger("remoe")

# What a resume may change (recorded in resume_changes.json and summary.json `resume_changes`): the step count
# (an extension: the schedule is stretched from the resume on) and the routing method's training knobs (not
# its architecture: model.<ModelConfig field> is refused). Any other training key is refused.
RESUMABLE = ("trainer.max_steps", "size.max_steps", "load_balancing")
RESUME_CHANGES = "resume_changes.json"


def read_resume_changes(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, RESUME_CHANGES)) as f:
            out = json.load(f)
        return out if isinstance(out, list) else []
    except (OSError, ValueError):
        return []


def check_same_arch(saved: dict, mcfg: ModelConfig, ignore: tuple[str, ...] = ()) -> None:
    """A ConfigError naming every field where the checkpoint's architecture differs from this run's."""
    diff = {k: (saved.get(k), v) for k, v in mcfg.to_dict().items() if k not in ignore and saved.get(k) != v}
    if diff:
        raise ConfigError("resume: the checkpoint was trained with a different model config: " +
                          ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items())))


class Resume(NamedTuple):
    path: str | None = None  # checkpoints/last.ckpt, or None: start from scratch
    arch: dict | None = None  # the checkpoint's architecture
    step: int = 0  # the optimizer step training continues from
    changes: tuple = ()  # the RESUMABLE keys this resume changes: ({step, key, before, after}, ...)


def _resume_changes(cfg: DictConfig, run_dir: str, step: int) -> tuple:
    """What this resume changes against the run's config_resolved.yaml: ConfigError naming every training
    key a resume may not change (RESUMABLE: the step count and routing-method knobs may), and the
    device count (each rank's batches are a function of the world size); the allowed changes, to record."""
    try:
        saved = read_config(run_dir)
    except ValueError as e:
        raise ConfigError(f"resume: {e}; nothing in the run folder was changed") from None
    if saved is None:
        return ()
    here = OmegaConf.to_container(cfg, resolve=True)
    refused, allowed = [], []
    for line in training_changes(saved, here):
        key = line.split(":", 1)[0]
        leaf = key.removeprefix("model.")
        knob = key.startswith("model.") and "." not in leaf and leaf not in ARCH_FIELDS | {"name"}
        (allowed if key in RESUMABLE or knob else refused).append(line)
    if refused:
        raise ConfigError(f"resume: {refused[0].split(':')[0]}: changed since this run started ({'; '.join(refused)}); "
                          "a resume may change only trainer.max_steps and the routing method's knobs "
                          "(docs/reliability.md): continue with the run's own settings, or train the new ones in another folder")
    try:
        before = world_size(OmegaConf.create(saved))
    except (ConfigError, ValueError, KeyError, AttributeError):
        before = None
    if before is not None and before != world_size(cfg):
        raise ConfigError(f"trainer.devices: this run trained on {before} devices x nodes, this resume has "
                          f"{world_size(cfg)}; each rank's batches depend on the device count, so the run would "
                          "not see the batches it was seeded with: resume on the same count")
    out = []
    for line in allowed:
        key, rest = line.split(": ", 1)
        a, b = rest.split(" there, ")
        out.append({"step": step, "key": key, "before": a, "after": b.removesuffix(" here")})
    return tuple(out)


def resume_checkpoint(cfg: DictConfig, run_dir: str, mcfg: ModelConfig) -> Resume:
    """The checkpoint to resume from, checked before the run folder is touched: a file
    that cannot be loaded, or that holds another architecture, is a ConfigError naming it. (Routing-method
    knobs such as alpha may change on resume: they are not the model.)"""
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if not cfg.resume:
        return Resume()
    if not os.path.exists(last):
        log.warning("resume=true but %s does not exist: starting from scratch", last)
        return Resume()
    try:
        ckpt = read_meta(last)  # a file, or a sharded folder (trainer=fsdp)
        if is_sharded(last):
            read_sharded_metadata(last)  # its shards' index, read without running code
        step = int(ckpt["global_step"])
    except Exception as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else "unreadable"
        raise ConfigError(f"resume: {last} cannot be loaded ({type(e).__name__}: {reason}); nothing in "
                          "the run folder was changed") from None
    try:
        check_format(ckpt, last)
    except CheckpointError as e:  # another format: refused in one line, whole
        raise ConfigError(f"resume: {e}; nothing in the run folder was changed") from None
    saved = dict(ckpt["hyper_parameters"]["model"])
    check_same_arch(saved, mcfg, ignore=("vocab_size",))  # the vocabulary is known after data prep
    optim = ckpt["hyper_parameters"].get("optim") or {}
    changed = [f"optim.{k}={optim.get(k, v)!r} there, {cfg.optim.get(k, v)!r} here" for k, v in RECIPE.items()
               if optim.get(k, v) != cfg.optim.get(k, v)]
    if changed:  # the optimizer's parameter groups (and their LRs) are the checkpoint's
        raise ConfigError("resume: the checkpoint was trained with another optimizer recipe: "
                          + ", ".join(changed))
    return Resume(last, saved, step, _resume_changes(cfg, run_dir, step))
