"""Routing statistics, each formula written once: what the controller, the logs, routing.jsonl, the
analyses, the benchmarks and the report all compute from routed-token counts.

counts: (L, E) tokens routed to each of the E (= E*G fine-grained) experts of each MoE layer;
tokens: (L,) tokens each layer saw. Plain numpy (torch CPU tensors convert with np.asarray).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np


def layer_sparsity(counts, tokens) -> np.ndarray:
    """Share of zero gates per layer: 1 - nnz / (T E)."""
    counts, tokens = np.asarray(counts), np.asarray(tokens)
    E = counts.shape[-1]
    return 1.0 - counts.sum(-1).astype(np.float64) / (np.maximum(tokens, 1).astype(np.float64) * E)


def experts_per_token(counts, tokens) -> np.ndarray:
    """Mean number of experts a token is routed to, per layer: nnz / T."""
    counts, tokens = np.asarray(counts), np.asarray(tokens)
    return counts.sum(-1).astype(np.float64) / np.maximum(tokens, 1)


def expert_share(counts) -> np.ndarray:
    """Each expert's share of its layer's routed (token, expert) pairs; rows sum to 1 (0 if none)."""
    counts = np.asarray(counts).astype(np.float64)
    return counts / counts.sum(-1, keepdims=True).clip(min=1)


def max_violation(counts) -> np.ndarray:
    """Load imbalance per layer, MaxVio of Wang et al. (2024): (max_e load_e - mean load) / mean load; 0 is
    perfectly balanced, E - 1 is every pair on one expert (0 if nothing was routed)."""
    counts = np.asarray(counts).astype(np.float64)
    mean = counts.mean(-1)
    return np.where(mean > 0, (counts.max(-1) - mean) / np.maximum(mean, 1e-300), 0.0)


@dataclass(frozen=True)
class RoutingStats:
    """One optimizer step's routing counts, summed over micro-batches and data-parallel ranks."""

    step: int
    counts: np.ndarray  # (L, E) int
    tokens: np.ndarray  # (L,) int

    @property
    def layer_sparsity(self) -> np.ndarray:
        return layer_sparsity(self.counts, self.tokens)

    @property
    def sparsity(self) -> float:
        """The step's sparsity S_i: the mean over layers (what ReMoE's controller compares to 1 - k/E)."""
        return float(self.layer_sparsity.mean())

    @property
    def experts_per_token(self) -> float:
        return float(self.layer_experts_per_token.mean())

    @property
    def layer_experts_per_token(self) -> np.ndarray:
        return experts_per_token(self.counts, self.tokens)

    @property
    def max_violation(self) -> float:
        """MaxVio averaged over layers (max_violation)."""
        return float(max_violation(self.counts).mean())

    def layer_below_target(self, k: int) -> list[bool]:
        """Per layer: sparsity < 1 - k/E, on the integer counts: nnz_l > k T_l."""
        return [int(n) > k * int(t) for n, t in zip(self.counts.sum(-1).tolist(), self.tokens.tolist())]

    def below_target(self, k: int) -> bool:
        """S_i < 1 - k/E, decided on the integer counts (exact): the float mean of per-layer sparsities can
        fall an ulp under a target that is not exact in binary (E=10, k=3: every layer exactly at 0.7 gives
        a mean of 0.6999999999999998 at some layer counts). S_i < 1 - k/E <=> sum_l nnz_l / T_l > L k."""
        nnz = self.counts.sum(-1).tolist()
        return sum(Fraction(int(n), max(int(t), 1)) for n, t in zip(nnz, self.tokens.tolist())) > len(nnz) * k

    def to_json(self) -> dict:
        """One line of routing.jsonl."""
        return {"step": self.step, "sparsity": self.sparsity, "tokens": self.tokens.tolist(),
                "counts": self.counts.tolist()}
