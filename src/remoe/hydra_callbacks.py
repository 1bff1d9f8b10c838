"""Hydra callbacks of train.py (conf/config.yaml `hydra.callbacks`).

- ValidateOnRunStart: a single run's config is checked before Hydra makes the run folder, so a config
  error leaves nothing behind (Hydra writes .hydra/ and the job log as the job starts).
- GridProgress: before a -m grid starts, how many points it has and an estimate of its time; then one line
  per point started and finished, with the time so far and the estimated time left.
- ReportOnMultirunEnd: regenerate the report when a multirun ends, so a finished sweep leaves its tables.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import sys
import time

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback

from .cli import describe
from .resolvers import run_mode_defaults

log = logging.getLogger("remoe.report")


class ValidateOnRunStart(Callback):
    """Hydra turns an exception of a callback into a warning and goes on, so a config error ends the
    process here: one line on stderr (remoe.cli.describe), exit code 2."""

    def on_run_start(self, config, **kwargs) -> None:
        from .train.spec import ConfigError, derive, validate

        HydraConfig.instance().set_config(config)  # as Hydra's run_job does next: ${hydra:...} resolves
        try:
            cfg = copy.deepcopy(config)
            run_mode_defaults(cfg, multirun=False)
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


# Seconds per (training token x million cost units) on a 2-core AMD EPYC (fp32), cost units = active
# parameters + total parameters / 10, fitted to the CPU replication's records (remoe E=4: 495 s, E=32: 690 s;
# dense 10 min, Dense x8 16-22 min predicted 8 / 16 min). A first guess only: from the first finished point
# on, the rate measured in this grid replaces it.
SECONDS_PER_TOKEN_MUNIT = 4.07e-5
POINT_OVERHEAD_S = 40  # start-up, validation and evaluation of one point (the default run: 114 s, 78 s by the rate)


def point_cost(cfg) -> tuple[float, float]:
    """(training tokens, cost units in millions) of one composed training config."""
    from .model import param_counts
    from .train.spec import model_config

    vocab = cfg.data.get("vocab_size") or 50257
    counts = param_counts(model_config(cfg, vocab_size=vocab))
    size = cfg.size
    tokens = size.max_steps * size.global_batch_size * size.seq_len
    return tokens, (counts["active"] + counts["total"] / 10) / 1e6


def grid_points(task_overrides: list[str]) -> list[list[str]]:
    """Every point of a -m grid: the task overrides with each sweep (a,b,c / range(...)) expanded, in
    Hydra's basic sweeper order (the cartesian product, the last sweep varying fastest)."""
    parsed = OverridesParser.create().parse_overrides(task_overrides)
    axes = []
    for o in parsed:
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(p) for p in itertools.product(*axes)]


def _hm(seconds: float) -> str:
    m = round(seconds / 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


class GridProgress(Callback):
    """Grid size and time estimate before a -m grid, then a line per point (stderr, flushed)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.costs: list[float] = []
        self.done_units = self.done_seconds = 0.0
        self.start = self.t_job = 0.0
        self.finished = 0

    def _say(self, msg: str) -> None:
        print(f"grid: {msg}", file=sys.stderr, flush=True)

    def _rate(self) -> float:
        return self.done_seconds / self.done_units if self.done_units else SECONDS_PER_TOKEN_MUNIT

    def on_multirun_start(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        self.start = time.time()
        points = grid_points(list(config.hydra.overrides.task))
        try:
            for p in points:
                cfg = compose("config", overrides=p)
                tokens, units = point_cost(cfg)
                self.costs.append(tokens * units)
        except Exception as e:  # an estimate must never stop a grid; a bad point fails in its own job
            self.costs = []
            self._say(f"{len(points)} points (no time estimate: {type(e).__name__})")
            return
        total = sum(self.costs) * SECONDS_PER_TOKEN_MUNIT + POINT_OVERHEAD_S * len(self.costs)
        spread = max(self.costs) / min(self.costs) if min(self.costs) > 0 else 1.0
        self._say(f"{len(points)} points -> {config.hydra.sweep.dir}; about {_hm(total)} on a 2-core CPU if none is "
                  f"done yet (the costliest point ~{spread:.1f}x the cheapest; completed points are skipped, "
                  "cut ones resume)")

    def on_job_start(self, config, **kwargs) -> None:
        if not self.enabled or not self.start:  # a single run: no grid to report on
            return
        self.t_job = time.time()
        n = len(self.costs)
        i = config.hydra.job.num
        left = sum(self.costs[i:]) * self._rate() if self.costs else None
        self._say(f"[{i + 1}/{n or '?'}] started {config.hydra.job.override_dirname or 'the default point'}; "
                  f"{_hm(time.time() - self.start)} so far" + (f", ~{_hm(left)} left" if left is not None else ""))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if not self.enabled or not self.start:
            return
        i = config.hydra.job.num
        took = time.time() - self.t_job
        if self.costs and took > 30:  # a skipped (completed) point says nothing about the rate
            self.done_units += self.costs[i]
            self.done_seconds += took
        left = sum(self.costs[i + 1:]) * self._rate() if self.costs else None
        status = getattr(getattr(job_return, "status", None), "name", "?").lower()
        self._say(f"[{i + 1}/{len(self.costs) or '?'}] finished ({status}) in {_hm(took)}; "
                  f"{_hm(time.time() - self.start)} so far" + (f", ~{_hm(left)} left" if left is not None else ""))
