"""The prepare_data entry point: compose conf/prepare_data.yaml, tokenize + pack in parallel, time the
training loader on the result, record both rates in prepared.json."""

from __future__ import annotations

import json
import logging
import os
import time

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..cli import UsageError, first_line, guard, task, unwritable
from ..model.presets import CONF_DIR
from .corpus import check_text_file, expand_files
from .datamodule import PREPARED, SOURCES, LMDataModule, check_prepare_target

log = logging.getLogger("remoe")


def loading_rate(folder: str, seq_len: int, micro_batch: int, batches: int) -> float:
    """Training-loader tokens/s reading `folder` (random access through ResumableBatchSampler)."""
    dm = LMDataModule(source="prepared", dir=folder, seq_len=seq_len, micro_batch_size=micro_batch)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * micro_batch * seq_len / (time.perf_counter() - t0)


def check(cfg: DictConfig) -> str:
    """Everything about the request that can be checked before any work (UsageError naming the key or
    file); returns the output folder."""
    out = os.path.abspath(str(cfg.out))
    try:
        check_prepare_target(cfg.data.source, out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if isinstance(cfg.num_proc, bool) or not isinstance(cfg.num_proc, int) or cfg.num_proc < 1:
        raise UsageError(f"num_proc: must be an int >= 1 (got {cfg.num_proc!r})")
    lcb = cfg.get("load_check_batches", 0)
    if isinstance(lcb, bool) or not isinstance(lcb, int) or lcb < 0:
        raise UsageError(f"load_check_batches: must be an int >= 0 (got {lcb!r})")
    if cfg.data.source not in SOURCES:
        raise UsageError(f"data.source: unknown source {cfg.data.source!r}; choose one of {SOURCES}")
    if cfg.data.source == "text_files":
        try:
            for path in expand_files(cfg.data.files or []):
                check_text_file(path)
        except (OSError, TypeError, ValueError) as e:
            raise UsageError(f"data.files: {str(e).removeprefix('data.files: ')}") from None
    if probe := unwritable(os.path.dirname(out)):
        raise UsageError(f"out: cannot write into {probe} (read-only or no permission)")
    return out


def prepare(cfg: DictConfig) -> dict:
    out = check(cfg)
    dm = instantiate(cfg.data)
    try:
        record = dm.prepare_to(out, num_proc=cfg.num_proc)
    except (FileNotFoundError, ValueError) as e:  # a data file named in the config; too little text to pack
        msg = first_line(e)
        raise UsageError(msg if msg.startswith("data") else f"data: {msg}") from None
    if cfg.load_check_batches:
        record["loading_tokens_per_s"] = loading_rate(out, cfg.size.seq_len, cfg.size.micro_batch_size,
                                                      cfg.load_check_batches)
        with open(os.path.join(out, PREPARED), "w") as f:
            json.dump(record, f, indent=1)
    return record


def _main(cfg: DictConfig) -> None:
    record = prepare(cfg)
    n = record["sequences"]
    log.info("prepared %s: %d train / %d validation sequences of %d tokens (%s train tokens) in %.1f s; "
             "tokenizing %.0f tokens/s per process (%d processes), loading %.0f tokens/s", cfg.out, n["train"],
             n["validation"], record["seq_len"] + 1, f"{record['train_tokens']:,}", record["seconds"],
             record["tokens_per_s_per_process"], record["num_proc"], record.get("loading_tokens_per_s", 0.0))


def main() -> None:
    """src/prepare_data.py: bad input is one line and exit code 2 before any work (remoe.cli)."""
    guard(hydra.main(config_path=str(CONF_DIR), config_name="prepare_data", version_base="1.3")(
        task("prepare_data")(_main)), "prepare_data")
