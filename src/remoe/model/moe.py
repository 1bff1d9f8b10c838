"""The MoE layer that replaces the FFN: router -> dispatch -> experts -> combine, plus routing stats.

Statistics (routed tokens per expert, tokens seen) accumulate in buffers on training forwards only;
the training loop reads them once per optimizer step (lambda update, logging) and resets them.
Sparsity of a layer = 1 - nnz/(T E) = 1 - sum(counts)/(tokens E); experts per token = sum(counts)/tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .dispatch import group_by_expert
from .experts import GroupedExperts
from .regularizers import l1_loss, lb_l1_loss, switch_aux_loss
from .routers import ReLURouter, TopKRouter


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.k, self.regularizer = cfg.router, cfg.n_active, cfg.regularizer
        E = cfg.n_experts
        if cfg.router == "topk":
            self.router = TopKRouter(cfg.d_model, E, cfg.n_active)
        elif cfg.router == "relu":
            self.router = ReLURouter(cfg.d_model, E)
        else:
            raise ValueError(f"router: unknown router {cfg.router!r}")
        self.experts = GroupedExperts(E, cfg.d_model, cfg.expert_ffn)
        self.register_buffer("routed_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.last_gates: torch.Tensor | None = None  # set when record_gates is True (analyses)
        self.record_gates = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (y, this layer's routing loss: Switch aux for topk, (LB-)L1 for relu)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates, probs = self.router(x)
        if self.kind == "topk":
            loss = switch_aux_loss(probs, gates, self.k)
        elif self.regularizer == "lb_l1":
            loss = lb_l1_loss(gates, self.k)
        else:
            loss = l1_loss(gates)
        routing = group_by_expert(gates)
        y = self.experts(x, routing)
        if self.training:
            with torch.no_grad():
                self.routed_counts += routing.counts
                self.tokens_seen += x.shape[0]
        if self.record_gates:
            self.last_gates = gates.detach()
        return y.to(x.dtype).reshape(shape), loss

    def reset_stats(self) -> None:
        self.routed_counts.zero_()
        self.tokens_seen.zero_()
