"""The MoE layer that replaces the FFN: router -> dispatch -> experts -> combine.

The router comes from the routing method (routing.py); the layer only runs it and returns its output,
from which the method computes its loss. Routed tokens per expert and tokens seen accumulate in buffers
on training forwards only; the training loop reads them once per optimizer step (routing.RoutingStats:
the controller update and the logs) and resets them.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .dispatch import group_by_expert
from .experts import GroupedExperts
from .routers import RouterOutput


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, router: nn.Module):
        super().__init__()
        E = cfg.n_experts
        self.router = router
        self.experts = GroupedExperts(E, cfg.d_model, cfg.expert_ffn)
        self.register_buffer("routed_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """x (..., d) and the token ids (...) of its positions (hash routing reads them)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routed = self.router(x, None if ids is None else ids.reshape(-1))
        routing = group_by_expert(routed.gates)
        y = self.experts(x, routing)
        if self.training:
            with torch.no_grad():
                self.routed_counts += routing.counts
                self.tokens_seen += x.shape[0]
        return y.to(x.dtype).reshape(shape), routed

    def reset_stats(self) -> None:
        self.routed_counts.zero_()
        self.tokens_seen.zero_()
