"""Routing analyses recorded during/after training for the report's figures (METHOD.md "Analyses").

- settling_step: steps until ReMoE's sparsity reaches the target band and stays there.
- routing_analysis: on held-out batches, per token id (count, mean active experts over layers), per
  domain x layer x expert routed-token counts, per-layer sparsity. Token frequency = count in those
  held-out batches (a proxy for corpus frequency).
- FlipProbe: every `interval` steps, the on/off routing states of a fixed probe batch; the flip rate is
  the share of (token, layer, expert) states that changed since the previous probe.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch


def settling_step(series: list[float], target: float, band: float = 0.05) -> int | None:
    """First step index from which |S - target| <= band holds to the end; None if it never settles."""
    last_out = -1
    for i, s in enumerate(series):
        if abs(s - target) > band:
            last_out = i
    return last_out + 1 if last_out + 1 < len(series) else None


@torch.no_grad()
def _gates(model, ids: torch.Tensor) -> list[torch.Tensor]:
    layers = model.moe_layers()
    for m in layers:
        m.record_gates = True
    try:
        model(ids)
        return [m.last_gates for m in layers]
    finally:
        for m in layers:
            m.record_gates, m.last_gates = False, None


@torch.no_grad()
def routing_analysis(model, loader, max_batches: int = 8) -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    V = model.cfg.padded_vocab_size
    count = torch.zeros(V, dtype=torch.long)
    active = torch.zeros(V, dtype=torch.float64)
    domains: dict[str, torch.Tensor] = {}
    nnz = zeros = 0
    per_layer_nnz = None
    for b, batch in enumerate(loader):
        if b >= max_batches:
            break
        ids = batch["input_ids"][:, :-1].to(device)
        gates = _gates(model, ids)
        on = torch.stack([(g > 0) for g in gates]).cpu()  # (L, T, E)
        flat = ids.reshape(-1).cpu()
        count += torch.bincount(flat, minlength=V)
        active.index_add_(0, flat, on.sum(-1).double().mean(0))  # experts per token, mean over layers
        per_layer_nnz = on.sum((1, 2)) if per_layer_nnz is None else per_layer_nnz + on.sum((1, 2))
        nnz += int(on.sum())
        zeros += int(on.numel())
        S = ids.shape[1]
        for r, dom in enumerate(batch["domain"]):
            rows = on[:, r * S : (r + 1) * S].sum(1)  # (L, E)
            domains[dom] = rows if dom not in domains else domains[dom] + rows
    model.train(was_training)
    seen = count.nonzero().flatten()
    L_, E = model.cfg.n_layer, model.cfg.n_experts
    tokens = int(count.sum())
    return {
        "tokens": tokens,
        "token_ids": seen.tolist(),
        "token_count": count[seen].tolist(),
        "token_mean_active": (active[seen] / count[seen]).tolist(),
        "domain_counts": {d: c.tolist() for d, c in sorted(domains.items())},
        "layer_sparsity": (1 - per_layer_nnz.double() / (tokens * E)).tolist() if tokens else [None] * L_,
    }


class FlipProbe(L.Callback):
    """Routing stability on a fixed probe batch: flip rate and flip count between consecutive probes."""

    def __init__(self, path: str, interval: int = 10):
        self.path, self.interval = path, interval
        self.probe: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.probe is None and trainer.datamodule is not None:
            self.probe = next(iter(trainer.datamodule.val_dataloader()))["input_ids"][:4, :-1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.probe is None or not trainer.is_global_zero or step % self.interval != 0 or \
                (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        model = pl_module.model
        was = model.training
        model.eval()
        on = torch.stack([g > 0 for g in _gates(model, self.probe.to(pl_module.device))]).cpu()
        model.train(was)
        if self.prev is not None:
            flips = int((on != self.prev).sum())
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "flip_count": flips, "flip_rate": flips / on.numel()}) + "\n")
        self.prev = on


def write_analysis(path: str, data: dict) -> None:
    from .runs import write_json_atomic

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json_atomic(path, data)
