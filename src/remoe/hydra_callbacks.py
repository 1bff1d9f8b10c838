"""Hydra callbacks of train.py (conf/config.yaml `hydra.callbacks`).

- ValidateOnRunStart: a single run's config is checked before Hydra makes the run folder, so a config
  error leaves nothing behind (Hydra writes .hydra/ and the job log as the job starts).
- ReportOnMultirunEnd: regenerate the report when a multirun ends, so a finished sweep leaves its tables.
"""

from __future__ import annotations

import logging
import os

from hydra.experimental.callback import Callback

log = logging.getLogger("remoe.report")


class ValidateOnRunStart(Callback):
    """Hydra turns an exception of a callback into a warning and goes on, so a config error ends the
    process here: one line on stderr (remoe.cli.describe), exit code 2."""

    def on_run_start(self, config, **kwargs) -> None:
        import copy
        import sys

        from hydra.core.hydra_config import HydraConfig

        from .cli import describe
        from .settings import ConfigError, derive, validate

        HydraConfig.instance().set_config(config)  # as Hydra's run_job does next: ${hydra:...} resolves
        try:
            cfg = copy.deepcopy(config)
            validate(cfg)
            derive(cfg)
        except ConfigError as e:
            print(f"train: {describe(e)[1]}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None


class ReportOnMultirunEnd(Callback):
    def __init__(self, enabled: bool = True, out_subdir: str = "report"):
        self.enabled, self.out_subdir = enabled, out_subdir

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        from .report.build import build_report

        sweep_dir = config.hydra.sweep.dir
        out = os.path.join(sweep_dir, self.out_subdir)
        try:
            res = build_report([sweep_dir], out)
            if res is None:
                log.warning("report: no usable run in %s; the existing report was kept", sweep_dir)
            else:
                log.info("report: %d runs, %d skipped -> %s", res["runs"], len(res["skipped"]), out)
        except Exception as e:  # a report failure must not hide the sweep's own outcome
            log.error("report generation failed: %s", e)
