"""Routers: token -> gate values over the E*G (fine-grained) experts.

Each returns a RouterOutput: a dense (T, E) gate matrix whose zeros mean "not routed" (dispatch computes
only the non-zero (token, expert) pairs), and the scores its method's loss needs. Routing runs in
float32 (or float64 if the input is), outside autocast, so that which gates are zero does not depend on
bf16 rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RouterOutput(NamedTuple):
    gates: torch.Tensor  # (T, E): weight of each expert's output; 0 = not routed
    scores: torch.Tensor | None  # (T, E) softmax probabilities (TopK), or None


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

    def forward(self, x: torch.Tensor) -> RouterOutput:
        probs = _router_logits(x, self.weight).softmax(dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        return RouterOutput(gates, probs)


class ReLURouter(nn.Module):
    """ReMoE: R(x) = ReLU(x W_r). No softmax, no top-k: each token gets 0..E experts."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        return RouterOutput(F.relu(_router_logits(x, self.weight)), None)
