"""Dropless dispatch plans: the routed (token, expert) pairs grouped by expert, then by token.

Only routed pairs are ever gathered, so a token with zero gates everywhere costs nothing (ReMoE) and
nothing is dropped (no capacity factor that drops). Three plans, one result (`Routing`), the same pairs
in the same order, so the expert stage's arithmetic (and its output, bitwise) does not depend on which
plan ran:

  by_token_choice   fixed k (TopK, Hash, aux-loss-free): the router's (T, k) chosen experts, a stable
                    argsort of them and a scatter-add for the counts. Shapes are known in advance: no host
                    sync, forward or backward.
  by_expert_choice  Expert Choice at its fixed capacity C: each expert's (C,) chosen tokens, sorted. No sync.
  group_by_expert   any gates (ReMoE: 0..E pairs per token): one nonzero() on the transposed gates, which
                    yields the pairs already in order. Its output size is data-dependent: on a GPU that
                    is a host sync in every layer.
  bounded           ReMoE on a GPU: torch.nonzero_static into a capacity the model sizes from recent steps
                    (transformer.PairCapacity); the pair count stays on the device, rows past it are
                    padding (gathered from token 0, combined into a dump row, outside every group), and
                    the model checks all layers' counts against their capacities in one sync per forward,
                    re-running the forward exactly if any overflowed: no pair is ever dropped.

`counts` and `offs` stay on the device; the expert stage reads them as host ints only on its per-expert
loop fallback (float64, builds without torch._grouped_mm) and the CPU bf16 bucketing (pad_groups).
A pair of a fixed-k plan whose gate is exactly 0 (a softmax probability that underflowed) is kept: it adds
0 to its token and passes a zero gradient, as the skipped pair would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    token_idx: torch.Tensor  # (N,) token of each routed pair, grouped by expert; padding rows: T (dump row)
    expert_idx: torch.Tensor  # (N,) expert of each pair, non-decreasing (padding rows: E - 1)
    weights: torch.Tensor  # (N,) gate value of each pair (padding rows: 0)
    counts: torch.Tensor  # (E,) routed pairs per expert, on the device (sums to the pairs, <= N)
    padded: bool = False  # rows past counts.sum() are padding (the bounded plan)


def _counts(expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Pairs per expert without a host sync (CUDA's bincount reads the max to size its output)."""
    return torch.zeros(n_experts, dtype=torch.long, device=expert_idx.device).scatter_add_(
        0, expert_idx, torch.ones_like(expert_idx))


def by_token_choice(gates: torch.Tensor, experts: torch.Tensor) -> Routing:
    """gates (T, E); experts (T, k): each token's k distinct experts. Pairs sorted by expert, then token."""
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # ties (one expert) keep token order
    token_idx = torch.div(order, k, rounding_mode="floor")
    expert_idx = flat.index_select(0, order)
    return Routing(token_idx, expert_idx, gates[token_idx, expert_idx], _counts(flat, gates.shape[1]))


def by_expert_choice(gates: torch.Tensor, tokens: torch.Tensor) -> Routing:
    """gates (T, E); tokens (C, E): each expert's C distinct tokens. Pairs sorted by expert, then token."""
    C, E = tokens.shape
    token_idx = tokens.t().sort(dim=1).values.reshape(-1)
    expert_idx = torch.arange(E, device=gates.device).repeat_interleave(C)  # int repeats: no sync
    return Routing(token_idx, expert_idx, gates[token_idx, expert_idx],
                   torch.full((E,), C, dtype=torch.long, device=gates.device))


def group_by_expert(gates: torch.Tensor) -> Routing:
    """Every non-zero gate, exactly (one host sync on a GPU: the pair count)."""
    expert_idx, token_idx = gates.t().nonzero(as_tuple=True)
    counts = torch.bincount(expert_idx, minlength=gates.shape[1])
    return Routing(token_idx, expert_idx, gates[token_idx, expert_idx], counts)


def bounded(gates: torch.Tensor, capacity: int) -> tuple[Routing, torch.Tensor]:
    """The non-zero gates into `capacity` rows, with no host sync: (plan, the true pair count on the device).
    If the count exceeds the capacity the plan is truncated (offsets clamped), and the caller must not use
    its result (transformer.Transformer re-runs the forward exactly)."""
    T, E = gates.shape
    nz = torch.nonzero_static(gates.t(), size=capacity, fill_value=-1)  # (capacity, 2): expert, token
    routed = gates != 0
    counts = routed.sum(0)
    n = counts.sum()
    valid = torch.arange(capacity, device=gates.device) < n
    expert_idx = torch.where(valid, nz[:, 0], E - 1)
    token_idx = torch.where(valid, nz[:, 1], T)
    weights = torch.where(valid, gates[token_idx.clamp_max(T - 1), expert_idx], 0.0)  # no grad to padding
    return Routing(token_idx, expert_idx, weights, counts, padded=True), n


def pad_groups(routing: Routing) -> Routing:
    """Pad each expert's group to a bucketed size with dummy pairs (token 0, gate 0).

    Why: oneDNN builds a new bf16 (AMX) GEMM kernel for every new row count, and routing changes the
    per-expert counts every step: on the CI CPUs a grouped GEMM with fresh counts took 23 ms instead of
    3.4 ms. Rounding each count up to a multiple of q = 2^max(4, floor(log2 n) - 3) (at most 12.5%
    padding above 128 rows) keeps the set of shapes small, so kernels are reused. A dummy pair has gate
    0, so it adds 0 to token 0 and sends no gradient to anything (its gate's grad is dropped). CPU only:
    it reads the padded size as a host int (free on a CPU)."""
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
