"""Callbacks that write run-directory files the report stage reads (rank zero only)."""

from __future__ import annotations

import json
import os

import lightning as L


class RoutingStatsWriter(L.Callback):
    """Appends, every `interval` optimizer steps, each MoE layer's routed-token counts per expert and the
    tokens seen (already reduced over ranks) to routing.jsonl: the source of the expert-load heatmaps
    and per-layer sparsity figures."""

    def __init__(self, path: str, interval: int = 50):
        self.path, self.interval = path, interval

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        r = getattr(pl_module, "last_routing", None)
        if not trainer.is_global_zero or r is None or r["step"] % self.interval != 0:
            return
        pl_module.last_routing = None  # one line per optimizer step
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": r["step"], "sparsity": r["sparsity"], "tokens": r["tokens"].tolist(),
                                "counts": r["counts"].tolist()}) + "\n")


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
            signal.signal(signal.SIGUSR1, lambda *_: setattr(trainer._signal_connector, "received_sigterm", True))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(os.path.join(self.ckpt_dir, "last.ckpt"))
        elif isinstance(exception, NonFiniteError):
            trainer.save_checkpoint(os.path.join(self.ckpt_dir, f"nonfinite-step{trainer.global_step}.ckpt"))
