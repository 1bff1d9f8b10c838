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
