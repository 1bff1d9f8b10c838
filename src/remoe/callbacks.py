"""Callbacks that write run-directory files the report stage reads (rank zero only)."""

from __future__ import annotations

import json
import os
import time

import lightning as L


class RoutingStatsWriter(L.Callback):
    """Appends, every `interval` optimizer steps, each MoE layer's routed-token counts per expert and the
    tokens seen (already reduced over ranks) to routing.jsonl: the source of the expert-load heatmaps
    and per-layer sparsity figures."""

    def __init__(self, path: str, interval: int = 50):
        self.path, self.interval = path, interval

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        r = pl_module.last_routing
        if not trainer.is_global_zero or r is None or r.step % self.interval != 0:
            return
        pl_module.last_routing = None  # one line per optimizer step
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(r.to_json()) + "\n")


def step_ends(trainer, batch_idx: int) -> bool:
    """Whether this micro-batch was the last of its optimizer step (gradient accumulation)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


class TrainThroughput(L.Callback):
    """Training tokens/s: per optimizer step (logged as train/tokens_per_s) and over the whole fit
    (`tokens_per_s`, for summary.json), validation excluded. Lightning's ThroughputMonitor reports a
    rolling window per micro-batch and keeps no whole-run total, so the run's figure is measured here."""

    def __init__(self):
        self.tokens, self.seconds = 0, 0.0
        self._t0: float | None = None
        self._step_tokens = 0

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:  # the step's timer starts at its first micro-batch
            self._t0 = time.perf_counter()
        self._step_tokens += batch["input_ids"][:, :-1].numel() * trainer.world_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not step_ends(trainer, batch_idx):
            return
        now = time.perf_counter()
        if now > self._t0:
            pl_module.log("train/tokens_per_s", self._step_tokens / (now - self._t0), on_step=True)
            self.tokens += self._step_tokens
            self.seconds += now - self._t0
        self._t0, self._step_tokens = now, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t0 = None


class NonFiniteError(RuntimeError):
    """Raised when the loss or the gradient norm is NaN/inf: training stops instead of going on silently."""


class FaultCheckpoint(L.Callback):
    """Checkpoints on the way out. SIGTERM/SIGUSR1 (what SLURM sends before preemption): Lightning stops
    after the current batch; we save last.ckpt so `resume=true` (or the requeued job) continues from it.
    A non-finite loss: a diagnostic checkpoint nonfinite-step<N>.ckpt beside it."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir

    def setup(self, trainer, pl_module, stage: str) -> None:
        import signal

        from lightning.pytorch.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue) and hasattr(signal, "SIGUSR1"):
            # outside SLURM's requeue handling, SIGUSR1 means "stop and checkpoint", like SIGTERM
            stop = lambda *_: setattr(trainer._signal_connector, "received_sigterm", True)  # noqa: E731
            signal.signal(signal.SIGUSR1, stop)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(os.path.join(self.ckpt_dir, "last.ckpt"))
        elif isinstance(exception, NonFiniteError):
            trainer.save_checkpoint(os.path.join(self.ckpt_dir, f"nonfinite-step{trainer.global_step}.ckpt"))
