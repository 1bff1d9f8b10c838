"""Callbacks that write run-directory files the report stage reads (rank zero only)."""

from __future__ import annotations

import json
import os
import signal
import time

import lightning as L
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException


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
    """Checkpoints on the way out. SIGTERM/SIGUSR1 (what SLURM sends before preemption) and SIGINT (a
    person's Ctrl-C) stop the run at the end of the optimizer step in progress (never between the
    micro-batches of one step, whose gradients a checkpoint does not hold), after that step's logs and
    validation, and last.ckpt is saved: `resume=true` (or the requeued job) continues exactly.
    `stopped_by` names the signal. A second Ctrl-C interrupts at once. A non-finite loss: a diagnostic
    checkpoint nonfinite-step<N>.ckpt beside it. Under SLURM auto-requeue, SIGUSR1 stays Lightning's."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir
        self.stopped_by: str | None = None  # "SIGTERM", "SIGUSR1" or "SIGINT"
        self._previous: dict = {}
        self._hold = False
        self._saved_at: int | None = None

    def _on_signal(self, signum, _frame) -> None:
        self.stopped_by = self.stopped_by or signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C is a plain KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning registered its own SIGTERM handler (which would stop between micro-batches)
        signals = [signal.SIGINT, signal.SIGTERM]
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue) and hasattr(signal, "SIGUSR1"):
            signals.append(signal.SIGUSR1)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stopped_by and step_ends(trainer, batch_idx):
            # where ModelCheckpoint saves too: the loop state Lightning's restore expects; this step's
            # logs (and a validation due now) still come from this process, and the resumed run starts
            # at the next step
            trainer.save_checkpoint(os.path.join(self.ckpt_dir, "last.ckpt"))
            self._saved_at = trainer.global_step
            trainer._signal_connector.received_sigterm = True  # Lightning stops after this step's logs

    # Lightning's validation loop stops between batches on the flag: a validation due at the stopping step
    # runs whole first (a resumed run would not run it again)
    def on_validation_start(self, trainer, pl_module) -> None:
        self._hold = trainer.state.fn == "fit" and trainer._signal_connector.received_sigterm
        if self._hold:
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._hold:
            trainer._signal_connector.received_sigterm = True
            self._hold = False

    def _restore_signals(self) -> None:
        """Put back the handlers found at train start. Before Lightning's own teardown restores its
        originals (it runs before the callbacks' teardown hook): restored later, Lightning's SIGTERM
        handler would outlive the fit, and processes forked afterwards (lm-eval's bootstrap pool) would
        ignore the SIGTERM that ends them — a hang."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_signals()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_signals()
        if isinstance(exception, SIGTERMException):
            self.stopped_by = self.stopped_by or "SIGTERM"
            if self._saved_at != trainer.global_step:  # stopped by Lightning itself (e.g. DDP's broadcast)
                trainer.save_checkpoint(os.path.join(self.ckpt_dir, "last.ckpt"))
        elif isinstance(exception, NonFiniteError):
            trainer.save_checkpoint(os.path.join(self.ckpt_dir, f"nonfinite-step{trainer.global_step}.ckpt"))


class _WithoutVersion:
    """Lightning's progress bar shows the logger's version as `v_num`: meaningless here (one run, one folder)."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class RichBar(_WithoutVersion, L.pytorch.callbacks.RichProgressBar):
    pass


class TQDMBar(_WithoutVersion, L.pytorch.callbacks.TQDMProgressBar):
    pass


def progress_bar() -> L.Callback:
    """The bar Lightning would pick (Rich when installed, else tqdm), without `v_num`."""
    return RichBar() if _RICH_AVAILABLE else TQDMBar()
