"""Routing analyses recorded during/after training for the report's figures (the paper's Sec. 5: per-layer
sparsity, active experts vs token frequency, domain specialisation, routing stability).

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

from .io import write_json_atomic
from .model.stats import layer_sparsity
from .train.callbacks import step_ends


@torch.no_grad()
def _routed(model, ids: torch.Tensor) -> torch.Tensor:
    """(L, T, E) bool: which (token, expert) pairs each MoE layer routes, from the model's own output."""
    return torch.stack([r.gates > 0 for r in model(ids).routing]).cpu()


@torch.no_grad()
def routing_analysis(model, loader, max_batches: int = 8) -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    V = model.cfg.padded_vocab_size
    count = torch.zeros(V, dtype=torch.long)
    active = torch.zeros(V, dtype=torch.float64)
    domains: dict[str, torch.Tensor] = {}
    per_layer_nnz = None
    for b, batch in enumerate(loader):
        if b >= max_batches:
            break
        ids = batch["input_ids"][:, :-1].to(device)
        on = _routed(model, ids)  # (L, T, E)
        flat = ids.reshape(-1).cpu()
        count += torch.bincount(flat, minlength=V)
        active.index_add_(0, flat, on.sum(-1).double().mean(0))  # experts per token, mean over layers
        per_layer_nnz = on.sum(1) if per_layer_nnz is None else per_layer_nnz + on.sum(1)  # (L, E)
        S = ids.shape[1]
        for r, dom in enumerate(batch["domain"]):
            rows = on[:, r * S : (r + 1) * S].sum(1)  # (L, E)
            domains[dom] = rows if dom not in domains else domains[dom] + rows
    model.train(was_training)
    seen = count.nonzero().flatten()
    L_ = model.cfg.n_layer
    tokens = int(count.sum())
    return {
        "tokens": tokens,
        "token_ids": seen.tolist(),
        "token_count": count[seen].tolist(),
        "token_mean_active": (active[seen] / count[seen]).tolist(),
        "domain_counts": {d: c.tolist() for d, c in sorted(domains.items())},
        "layer_sparsity": layer_sparsity(per_layer_nnz, [tokens] * L_).tolist() if tokens else [None] * L_,
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
                not step_ends(trainer, batch_idx):
            return
        model = pl_module.model
        was = model.training
        model.eval()
        on = _routed(model, self.probe.to(pl_module.device))
        model.train(was)
        if self.prev is not None:
            flips = int((on != self.prev).sum())
            with open(self.path, "a") as f:
                rec = {"step": step, "flip_count": flips, "flip_rate": flips / on.numel()}
                f.write(json.dumps(rec) + "\n")
        self.prev = on


def write_analysis(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json_atomic(path, data)


@torch.no_grad()
def expert_similarity(model) -> dict:
    """How alike each MoE layer's experts are: pairwise cosine similarity of the experts' flattened weights
    (W1|W3 and W2 together), mean and max over distinct pairs, per layer. Experts that left a dense start
    near-identical stay near 1; specialised experts drift apart."""
    layers = []
    for m in model.moe_layers():
        w = torch.cat([m.experts.w13.flatten(1), m.experts.w2.flatten(1)], dim=1).double()
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = w @ w.t()
        pairs = cos[torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)]
        layers.append({"mean": float(pairs.mean()), "max": float(pairs.max())})
    return {"layers": layers}
