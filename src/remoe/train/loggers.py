"""Lightning's loggers, adjusted so that no run loses its metrics.

CSVLogger: Lightning's deletes an existing metrics.csv when a logger starts in a non-empty folder, so a
resumed run kept only the rows logged after the resume. Here metrics.csv is appended to; on resume the
rows the interrupted process logged at or after the checkpoint's step (which the resumed run logs again)
are dropped, with any half-written last line; a fresh start in a folder that already has a metrics.csv
moves the old file aside (metrics-<time>.csv) instead of deleting it. Rows are flushed every step, and
every rewrite of the file is atomic (temp file + rename).

WandbLogger: Lightning's, minus the `anonymous=None` it always passes to wandb.init (wandb >= 0.19 warns
on any value: the setting is gone).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _PLExperimentWriter

from ..io import write_text_atomic

log = logging.getLogger("remoe")


def _rows(path: str) -> tuple[list[str], list[dict]]:
    """(header, complete rows) of a metrics.csv; a last line without its newline (a write cut short by a
    kill) is not a row."""
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def _write(path: str, header: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header)  # "\r\n" lines, as Lightning writes them
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


class _AppendingWriter(_PLExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):  # keep its columns: appended rows line up with them
            self.metrics_keys = _rows(self.metrics_file_path)[0]

    def _check_log_dir_exists(self) -> None:
        """Lightning's deletes metrics.csv here; this one keeps it."""

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        _write(self.metrics_file_path, fieldnames, _rows(self.metrics_file_path)[1])

    def start_at(self, step: int) -> None:
        """This run logs from `step` on: drop later rows of an interrupted process (resume), or move a
        previous run's file aside (fresh start at step 0)."""
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        if step == 0:
            aside = os.path.join(self.log_dir, f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.csv")
            os.replace(path, aside)
            log.warning("a fresh run in %s: the previous metrics.csv was moved to %s", self.log_dir, aside)
            self.metrics_keys = []
            return
        header, rows = _rows(path)
        kept = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < step]
        _write(path, header, kept)
        self.metrics_keys = header


assert issubclass(_AppendingWriter, _ExperimentWriter)


class CSVLogger(_CSVLogger):
    """metrics.csv that survives resumes: see the module docstring."""

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def start_at(self, step: int) -> None:
        self.experiment.start_at(step)


class WandbLogger(_WandbLogger):
    def __init__(self, *args, settings=None, **kwargs):
        if settings is not None:  # from Hydra: a DictConfig; wandb.init takes a dict or wandb.Settings
            from omegaconf import OmegaConf

            kwargs["settings"] = OmegaConf.to_container(settings) if OmegaConf.is_config(settings) else settings
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
