"""The experts: E*G SwiGLU FFNs of ffn_hidden/G units, stored stacked so one parameter holds a layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, ffn: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, ffn))  # gate branch
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, ffn))  # up branch
        self.w2 = nn.Parameter(torch.empty(n_experts, ffn, d_model))  # down
        self.rows_computed = 0  # work counter: (token, expert) rows fed through an expert

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (N, d) rows grouped by expert, counts: (E,) rows per expert. Empty experts are skipped."""
        self.rows_computed += x.shape[0]
        # unbind once: its backward stacks the per-expert grads in one write, where indexing w[e] per
        # expert would allocate and fill a zero tensor of the whole stack for each expert
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            xe = x[start : start + n]
            outs.append((F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e])
            start += n
        if not outs:
            return x.new_zeros(0, self.w2.shape[-1])
        return torch.cat(outs)

    def zero_touch(self) -> torch.Tensor:
        """0 * (sum of weights): keeps every weight in the graph when a layer routes no token at all,
        so DDP's reducer sees a gradient (of zeros) on every rank."""
        return 0.0 * (self.w1.sum() + self.w2.sum() + self.w3.sum())
