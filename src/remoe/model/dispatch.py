"""Dropless dispatch plan: the (token, expert) pairs with a non-zero gate, grouped by expert.

Only non-zero pairs are ever gathered, so a token with zero gates everywhere costs nothing (ReMoE) and
nothing is dropped (no capacity factor). One nonzero() on the transposed gates yields the pairs already
sorted by expert, then by token: no per-token Python, no extra sort. The gather of the pairs' rows and
the gate-weighted combine back into tokens run fused with the expert GEMMs (experts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    token_idx: torch.Tensor  # (N,) token of each routed pair, grouped by expert
    expert_idx: torch.Tensor  # (N,) expert of each pair, non-decreasing
    weights: torch.Tensor  # (N,) gate value of each pair
    counts: torch.Tensor  # (E,) routed tokens per expert (sums to N)


def group_by_expert(gates: torch.Tensor) -> Routing:
    expert_idx, token_idx = gates.t().nonzero(as_tuple=True)
    counts = torch.bincount(expert_idx, minlength=gates.shape[1])
    return Routing(token_idx, expert_idx, gates[token_idx, expert_idx], counts)
