"""Regenerate the report when a multirun ends, so a finished sweep leaves its tables behind."""

from __future__ import annotations

import logging
import os

from hydra.experimental.callback import Callback

log = logging.getLogger("remoe.report")


class ReportOnMultirunEnd(Callback):
    def __init__(self, enabled: bool = True, out_subdir: str = "report"):
        self.enabled, self.out_subdir = enabled, out_subdir

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        from .build import build_report

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
