"""Routers: token -> gate values over the E*G (fine-grained) experts.

Each takes the layer's tokens x (T, d) and their token ids (T,) (only hash routing reads them) and returns
a RouterOutput: a dense (T, E) gate matrix whose zeros mean "not routed" (dispatch computes only the
non-zero (token, expert) pairs), the scores its method's loss needs, and, where the number of pairs is
fixed by the method, which pairs it chose (the k experts of each token, or the C tokens of each expert):
dispatch then groups them on the device with no host sync (dispatch.py). Routing runs in float32 (or
float64 if the input is), outside autocast, so that which gates are zero does not depend on bf16 rounding.
State a router needs at inference (the hash table, the aux-loss-free expert bias) is a persistent buffer:
it travels in every checkpoint and export with the weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RouterOutput(NamedTuple):
    gates: torch.Tensor  # (T, E): weight of each expert's output; 0 = not routed
    scores: torch.Tensor | None  # (T, E) router probabilities/affinities its method's loss or stats use
    experts: torch.Tensor | None = None  # (T, k): each token's chosen experts (token choice, fixed k)
    tokens: torch.Tensor | None = None  # (C, E): each expert's chosen tokens (expert choice, fixed C)


def _router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype))


class TopKRouter(nn.Module):
    """TopK MoE (dMoE): p = softmax(x W_r) over all experts, then keep the k largest p.

    Pre-softmax top-k: the gates are the chosen experts' softmax probabilities, NOT renormalised.
    """

    def __init__(self, d_model: int, n_experts: int, k: int):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> RouterOutput:
        probs = _router_logits(x, self.weight).softmax(dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        return RouterOutput(gates, probs, experts=top_i)


class ReLURouter(nn.Module):
    """ReMoE: R(x) = ReLU(x W_r). No softmax, no top-k: each token gets 0..E experts."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> RouterOutput:
        return RouterOutput(F.relu(_router_logits(x, self.weight)), None)


def balanced_hash(vocab: int, n_experts: int, k: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(vocab, k) table of k distinct experts per token id: hash j sends the token of rank r in a random
    permutation of the vocabulary to expert r mod E (each hash alone is balanced over the vocabulary to
    within one id); a collision with an earlier hash of the same id moves on to the next free expert."""
    table = torch.empty(vocab, k, dtype=torch.long)
    for j in range(k):
        e = torch.empty(vocab, dtype=torch.long)
        e[torch.randperm(vocab, generator=generator)] = torch.arange(vocab) % n_experts
        for _ in range(j):  # at most j earlier experts to step over
            clash = (table[:, :j] == e[:, None]).any(1)
            e = torch.where(clash, (e + 1) % n_experts, e)
        table[:, j] = e
    return table


class HashRouter(nn.Module):
    """Hash layers (Roller et al., 2021): token id -> k fixed distinct experts (balanced_hash), gate 1.
    No parameters, nothing learned; the table is drawn from the run's seeded RNG when the model is built
    (a different table per layer) and is a buffer, so checkpoints and exports carry it."""

    def __init__(self, vocab: int, n_experts: int, k: int):
        super().__init__()
        self.n_experts = n_experts
        self.register_buffer("table", balanced_hash(vocab, n_experts, k))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> RouterOutput:
        if ids is None:
            raise ValueError("hash routing needs the token ids of the layer's tokens")
        dtype = torch.promote_types(x.dtype, torch.float32)
        gates = torch.zeros(x.shape[0], self.n_experts, dtype=dtype, device=x.device)
        chosen = self.table[ids.reshape(-1)]
        return RouterOutput(gates.scatter_(1, chosen, 1.0), None, experts=chosen)


def expert_capacity(tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Expert Choice's C = capacity_factor * T * k / E tokens per expert (floor, in [1, T])."""
    return min(tokens, max(1, math.floor(capacity_factor * tokens * k / n_experts)))


class ExpertChoiceRouter(nn.Module):
    """Expert Choice (Zhou et al., 2022): p = softmax(x W_r) over experts for each token; each expert takes
    the C tokens of the batch with the highest p for it (expert_capacity); gate = p. A token gets 0..E
    experts. NOT causal: whether a token is taken depends on every other token in the forward, later
    positions and other sequences included, so a token's output depends on the batch it comes in."""

    def __init__(self, d_model: int, n_experts: int, k: int, capacity_factor: float):
        super().__init__()
        self.k, self.capacity_factor = k, capacity_factor
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> RouterOutput:
        probs = _router_logits(x, self.weight).softmax(dim=-1)
        C = expert_capacity(x.shape[0], probs.shape[1], self.k, self.capacity_factor)
        top_p, top_t = probs.topk(C, dim=0)  # (C, E): each expert's chosen tokens
        return RouterOutput(torch.zeros_like(probs).scatter(0, top_t, top_p), probs, tokens=top_t)


class AuxFreeRouter(nn.Module):
    """Auxiliary-loss-free balancing (Wang et al., 2024; DeepSeek-V3): affinities s = sigmoid(x W_r) (or
    softmax), the k experts chosen on s + b with a per-expert bias b that only selects (no gradient,
    updated outside backprop by the routing method after each optimizer step), gates = the chosen s,
    divided by their sum when norm_topk_prob (DeepSeek-V3 with k>1; at k=1 that makes every gate 1 and the
    router gets no gradient, so it is off there)."""

    def __init__(self, d_model: int, n_experts: int, k: int, score_func: str, norm_topk_prob: bool):
        super().__init__()
        self.k, self.score_func, self.norm_topk_prob = k, score_func, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> RouterOutput:
        logits = _router_logits(x, self.weight)
        s = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        chosen = (s.detach() + self.expert_bias.to(s.dtype)).topk(self.k, dim=-1).indices
        g = s.gather(1, chosen)
        if self.norm_topk_prob:
            g = g / g.sum(-1, keepdim=True)
        return RouterOutput(torch.zeros_like(s).scatter(1, chosen, g), s, experts=chosen)
