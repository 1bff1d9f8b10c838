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


def pad_groups(routing: Routing) -> Routing:
    """Pad each expert's group to a bucketed size with dummy pairs (token 0, gate 0).

    Why: oneDNN builds a new bf16 (AMX) GEMM kernel for every new row count, and routing changes the
    per-expert counts every step: on the CI CPUs a grouped GEMM with fresh counts took 23 ms instead of
    3.4 ms. Rounding each count up to a multiple of q = 2^max(4, floor(log2 n) - 3) (at most 12.5%
    padding above 128 rows) keeps the set of shapes small, so kernels are reused. A dummy pair has gate
    0, so it adds 0 to token 0 and sends no gradient to anything (its gate's grad is dropped)."""
    counts = routing.counts
    n = counts.clamp_min(1).float()
    q = torch.exp2((torch.floor(torch.log2(n)) - 3).clamp_min(4)).long()
    padded = torch.where(counts > 0, (counts + q - 1) // q * q, 0)
    starts, pstarts = torch.cumsum(counts, 0) - counts, torch.cumsum(padded, 0) - padded
    rank = torch.arange(routing.token_idx.numel(), device=counts.device) - starts[routing.expert_idx]
    pos = pstarts[routing.expert_idx] + rank
    n_pad = int(padded.sum())
    token_idx = routing.token_idx.new_zeros(n_pad).index_copy_(0, pos, routing.token_idx)
    weights = routing.weights.new_zeros(n_pad).scatter(0, pos, routing.weights)  # differentiable in weights
    expert_idx = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), padded)
    return Routing(token_idx, expert_idx, weights, padded)
