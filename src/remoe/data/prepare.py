"""The prepare_data entry point: compose conf/prepare_data.yaml, tokenize + pack in parallel, time the
training loader on the result, record both rates in prepared.json."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from .datamodule import PREPARED, LMDataModule, check_prepare_target

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


def prepare(cfg: DictConfig) -> dict:
    out = os.path.abspath(str(cfg.out))
    check_prepare_target(cfg.data.source, out)
    if not isinstance(cfg.num_proc, int) or cfg.num_proc < 1:
        raise ValueError(f"num_proc: must be an int >= 1 (got {cfg.num_proc!r})")
    dm = instantiate(cfg.data)
    record = dm.prepare_to(out, num_proc=cfg.num_proc)
    if cfg.load_check_batches:
        record["loading_tokens_per_s"] = loading_rate(out, cfg.size.seq_len, cfg.size.micro_batch_size,
                                                      cfg.load_check_batches)
        with open(os.path.join(out, PREPARED), "w") as f:
            json.dump(record, f, indent=1)
    return record


def _main(cfg: DictConfig) -> None:
    try:
        record = prepare(cfg)
    except (ValueError, FileNotFoundError) as e:  # our messages start with the key; a missing file is data's
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.error("config error: %s", msg if isinstance(e, ValueError) else f"data: {msg}")
        sys.exit(2)
    n = record["sequences"]
    log.info("prepared %s: %d train / %d validation sequences of %d tokens (%s train tokens) in %.1f s; "
             "tokenizing %.0f tokens/s per process (%d processes), loading %.0f tokens/s", cfg.out, n["train"],
             n["validation"], record["seq_len"] + 1, f"{record['train_tokens']:,}", record["seconds"],
             record["tokens_per_s_per_process"], record["num_proc"], record.get("loading_tokens_per_s", 0.0))


def main() -> None:
    from ..model.presets import CONF_DIR

    hydra.main(config_path=str(CONF_DIR), config_name="prepare_data", version_base="1.3")(_main)()
