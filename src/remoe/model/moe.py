"""The MoE layer that replaces the FFN: router -> dispatch -> experts -> combine.

The router comes from the routing method (routing.py); the layer only runs it and returns its output,
from which the method computes its loss. Dispatch (dispatch.py) follows what the router chose: a fixed
number of pairs (token choice at k, expert choice at C) is grouped on the device with no host sync; a
variable number (ReMoE) goes through the exact nonzero(), or, with a PairCapacity (the `moe_dispatch` run
setting; on by default on GPUs), into a static capacity that the model checks once per forward
(transformer.Transformer.forward). Routed pairs per expert and tokens seen accumulate in buffers on
training forwards only; the training loop reads them once per optimizer step (routing.RoutingStats: the
controller update and the logs) and resets them.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn

from .config import ModelConfig
from .dispatch import Routing, bounded, by_expert_choice, by_token_choice, group_by_expert
from .experts import GroupedExperts
from .routers import RouterOutput


class PairCapacity:
    """How many (token, expert) rows one layer's bounded dispatch reserves: the largest pairs-per-token of
    its last `window` forwards, times 1 + headroom, times the forward's tokens, rounded up to a multiple
    of `quantum` rows (at most T * E). Before any forward has been seen, and for the forward after an
    overflow, `rows` is None: the exact plan runs (and is observed)."""

    def __init__(self, n_experts: int, headroom: float = 0.125, window: int = 16, quantum: int = 128):
        self.n_experts, self.headroom, self.quantum = n_experts, headroom, quantum
        self.recent: deque[float] = deque(maxlen=window)
        self.exact_next = True

    def rows(self, tokens: int) -> int | None:
        if self.exact_next or not self.recent:
            return None
        want = math.ceil(tokens * max(self.recent) * (1 + self.headroom))
        return max(1, min(tokens * self.n_experts, -(-want // self.quantum) * self.quantum))

    def observe(self, pairs: int, tokens: int, used: int | None) -> bool:
        """Record one forward's pair count; True if it overflowed the `used` rows (its plan is invalid)."""
        self.recent.append(pairs / max(tokens, 1))
        over = used is not None and pairs > used
        self.exact_next = over
        return over


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, router: nn.Module):
        super().__init__()
        E = cfg.n_experts
        self.router = router
        self.experts = GroupedExperts(E, cfg.d_model, cfg.expert_ffn)
        self.register_buffer("routed_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=False)
        # a run setting, not architecture: variable-count routing dispatches into a static capacity
        self.capacity: PairCapacity | None = None
        self.pairs: torch.Tensor | None = None  # the last forward's pair count, on the device (capacity only)
        self.rows_used: int | None = None  # the last forward's reserved rows (None: exact plan)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """x (..., d) and the token ids (...) of its positions (hash routing reads them)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routed = self.router(x, None if ids is None else ids.reshape(-1))
        routing = self.plan(routed)
        y = self.experts(x, routing)
        if self.training:
            with torch.no_grad():
                self.routed_counts += routing.counts
                self.tokens_seen += x.shape[0]
        return y.to(x.dtype).reshape(shape), routed

    @torch.compiler.disable  # host-side choices (the capacity's rows) stay out of compiled graphs
    def plan(self, routed: RouterOutput) -> Routing:
        self.pairs = None
        if routed.experts is not None:
            return by_token_choice(routed.gates, routed.experts)
        if routed.tokens is not None:
            return by_expert_choice(routed.gates, routed.tokens)
        if self.capacity is None:
            return group_by_expert(routed.gates)
        self.rows_used = self.capacity.rows(routed.gates.shape[0])
        if self.rows_used is None:
            routing = group_by_expert(routed.gates)
            self.pairs = routing.counts.sum()
            return routing
        routing, self.pairs = bounded(routed.gates, self.rows_used)
        return routing

    def reset_stats(self) -> None:
        self.routed_counts.zero_()
        self.tokens_seen.zero_()
