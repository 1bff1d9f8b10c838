"""The experts: E*G SwiGLU FFNs of ffn_hidden/G units, stored stacked so one parameter holds a layer,
and the fused gather -> grouped GEMMs -> gate-scale -> scatter that runs them.

One autograd Function does the whole expert stage with its backward written out: no per-expert
autograd nodes, the gate applied on whichever of the hidden (N, ffn/G) and the output (N, d) is
narrower, and on torch builds that have it `torch._grouped_mm` runs all experts in one call
(CPU fp32/bf16, CUDA bf16), with a per-expert `mm` loop as the fallback (float64, older torch, shapes a
kernel refuses). Per routed pair p = (token t, expert e, gate g):
    y[t] += g * SwiGLU_e(x[t]) = g * (silu(x[t] W1_e) * (x[t] W3_e)) W2_e
W1|W3 are stored fused as w13 (E, d, 2f): [..., :f] is the gate branch W1, [..., f:] the up branch W3.
SwiGLU, the dense FFN, is here too: the same math for one expert that sees every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dispatch import Routing, pad_groups

_GMM_BROKEN: set = set()  # (device type, dtype, kind) where torch._grouped_mm raised: use the loop


def _gmm_ok(t: torch.Tensor, kind: str) -> bool:
    if not hasattr(torch, "_grouped_mm") or (t.device.type, t.dtype, kind) in _GMM_BROKEN:
        return False
    return t.dtype in (torch.float32, torch.bfloat16) if t.device.type == "cpu" else t.dtype == torch.bfloat16


def gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor,
        trans_b: bool = False) -> torch.Tensor:
    """Grouped a @ b: a (N, K) rows grouped by expert (counts, on the device), b (E, K, M) -> (N, M).
    trans_b: b is (E, M, K) and b[e]^T is used. Rows past offs[-1] (padding) are left unwritten."""
    bt = b.transpose(-2, -1) if trans_b else b
    if _gmm_ok(a, "mm"):
        try:
            return torch._grouped_mm(a, bt, offs)
        except RuntimeError:
            _GMM_BROKEN.add((a.device.type, a.dtype, "mm"))
    out = a.new_empty(a.shape[0], bt.shape[-1])
    start = 0
    for e, n in enumerate(counts.tolist()):  # the fallback reads the counts on the host
        n = min(n, a.shape[0] - start)  # an overflowed bounded plan (discarded by the model) stays in bounds
        if n > 0:
            torch.mm(a[start : start + n], bt[e], out=out[start : start + n])
            start += n
    return out


def gmm_weight_grad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-expert a_e^T @ b_e: a (N, K), b (N, M) grouped by expert -> (E, K, M); empty experts get 0.
    Rows past offs[-1] are not read."""
    if _gmm_ok(a, "wgrad"):
        try:
            return torch._grouped_mm(a.t(), b, offs)
        except RuntimeError:
            _GMM_BROKEN.add((a.device.type, a.dtype, "wgrad"))
    out = a.new_zeros(counts.numel(), a.shape[1], b.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        n = min(n, a.shape[0] - start)
        if n > 0:
            torch.mm(a[start : start + n].t(), b[start : start + n], out=out[e])
            start += n
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _ExpertsFn(torch.autograd.Function):
    """x (T, d) -> y (T, d) through the routed pairs; differentiable in x, w13, w2 and the gates.
    The gate multiplies whichever of the hidden h (N, f) and the output o (N, d) is narrower.
    padded: rows past the pairs are padding (token_idx T): gathered from token T-1, combined into a dump row
    T that is cut off, so whatever the grouped GEMMs leave in them never reaches a token or a weight."""

    @staticmethod
    def forward(ctx, x, w13, w2, gates, token_idx, offs, counts, cdt, padded):
        with torch.autocast(x.device.type, enabled=False):
            f, d = w2.shape[1], w2.shape[2]
            w13c, w2c = w13.to(cdt), w2.to(cdt)
            g = gates.to(cdt)[:, None]
            gather_idx = token_idx.clamp_max(x.shape[0] - 1) if padded else token_idx
            xs = x.to(cdt).index_select(0, gather_idx)  # dispatch: (N, d), grouped by expert
            ab = gmm(xs, w13c, offs, counts)  # (N, 2f) = [x W1 | x W3]
            silu_a = F.silu(ab[:, :f])
            h = silu_a * ab[:, f:]
            if f < d:
                o = gmm(h * g, w2c, offs, counts)  # already gate-scaled
                ctx.save_for_backward(xs, ab, silu_a, h, gates, token_idx, offs, w13c, w2c)
            else:
                o_raw = gmm(h, w2c, offs, counts)
                o = o_raw * g
                ctx.save_for_backward(xs, ab, silu_a, h, gates, token_idx, offs, w13c, w2c, o_raw)
            y = o.new_zeros(x.shape[0] + padded, d).index_add_(0, token_idx, o)[: x.shape[0]]  # combine
        ctx.counts, ctx.dtypes, ctx.padded = counts, (x.dtype, w13.dtype, w2.dtype), padded
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, ab, silu_a, h, gates, token_idx, offs, w13c, w2c, *o_raw = ctx.saved_tensors
        counts, (x_dt, w13_dt, w2_dt), padded = ctx.counts, ctx.dtypes, ctx.padded
        acc = torch.promote_types(xs.dtype, torch.float32)
        with torch.autocast(dy.device.type, enabled=False):
            f = w2c.shape[1]
            g = gates.to(xs.dtype)[:, None]
            gather_idx = token_idx.clamp_max(dy.shape[0] - 1) if padded else token_idx
            dyg = dy.to(xs.dtype).index_select(0, gather_idx)  # (N, d)
            if o_raw:  # y = g * (h W2)
                dgates = (dyg * o_raw[0]).sum(-1, dtype=acc)
                do = dyg * g
                dw2 = gmm_weight_grad(h, do, offs, counts)  # (E, f, d)
                dh = gmm(do, w2c, offs, counts, trans_b=True)  # (N, f)
            else:  # y = (g * h) W2
                u = gmm(dyg, w2c, offs, counts, trans_b=True)
                dgates = (h * u).sum(-1, dtype=acc)
                dw2 = gmm_weight_grad(h * g, dyg, offs, counts)
                dh = u * g
            dab = torch.empty_like(ab)  # [d(x W1) | d(x W3)], one buffer for the fused GEMMs
            dab[:, :f].copy_(torch.ops.aten.silu_backward(dh * ab[:, f:], ab[:, :f]))
            torch.mul(dh, silu_a, out=dab[:, f:])
            dw13 = gmm_weight_grad(xs, dab, offs, counts)  # (E, d, 2f)
            dxs = gmm(dab, w13c, offs, counts, trans_b=True)  # (N, d)
            dx = dxs.new_zeros(dy.shape[0] + padded, dxs.shape[1]).index_add_(0, token_idx, dxs)[: dy.shape[0]]
            # padding rows' dgates are garbage (unwritten GEMM rows): the bounded plan's where() drops them
        return (dx.to(x_dt), dw13.to(w13_dt), dw2.to(w2_dt), dgates.to(gates.dtype),
                None, None, None, None, None)


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, ffn: int):
        super().__init__()
        self.ffn = ffn  # each expert's hidden width (W2's fan-in)
        self.w13 = nn.Parameter(torch.empty(n_experts, d_model, 2 * ffn))  # gate W1 | up W3
        self.w2 = nn.Parameter(torch.empty(n_experts, ffn, d_model))  # down
        # A memory ceiling for dense routing (ReMoE's Stage I routes most tokens to most experts): above this
        # many experts per token, a training forward keeps only the stage's inputs and recomputes the rest
        # in backward (torch.utils.checkpoint), so a layer holds O(T d + N) instead of O(N (d + 4 ffn/G))
        # for backward; the numbers are the same. None: never (a run setting, not architecture).
        self.recompute_above: float | None = None

    @torch.compiler.disable  # eager under torch.compile: the fake-tensor rule of _grouped_mm wants bf16
    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: (T, d) -> (T, d) = sum over each token's routed pairs of gate * expert output.
        Only routed pairs are computed; tokens with no pair get 0. No host sync on the grouped-GEMM path."""
        # no routed pair: keep every weight in the graph (DDP's reducer needs a grad, of zeros, on every rank)
        if routing.token_idx.numel() == 0:
            return x.new_zeros(x.shape) + 0.0 * (self.w13.sum() + self.w2.sum()) + 0.0 * routing.weights.sum()
        cdt = _compute_dtype(x)
        if x.device.type == "cpu" and cdt in (torch.bfloat16, torch.float16) and not routing.padded:
            routing = pad_groups(routing)  # reuse oneDNN's per-shape kernels (dispatch.pad_groups)
        offs = torch.cumsum(routing.counts, 0, dtype=torch.int32)
        if routing.padded:  # an overflowed bounded plan: keep the groups in bounds (the model re-runs it)
            offs = offs.clamp_max(routing.token_idx.numel())
        args = (x, self.w13, self.w2, routing.weights, routing.token_idx, offs, routing.counts, cdt, routing.padded)
        if self.recompute_above is not None and torch.is_grad_enabled() \
                and routing.token_idx.numel() > self.recompute_above * x.shape[0]:
            return checkpoint(_ExpertsFn.apply, *args, use_reentrant=False)
        return _ExpertsFn.apply(*args)


class SwiGLU(nn.Module):
    """The dense FFN: W2 (silu(x W1) * (x W3)), hidden width ffn (x ffn_mult for "Dense xM")."""

    def __init__(self, d_model: int, ffn: int):
        super().__init__()
        self.ffn = ffn
        self.w13 = nn.Linear(d_model, 2 * ffn, bias=False)  # gate W1 | up W3, one GEMM (as the experts)
        self.w2 = nn.Linear(ffn, d_model, bias=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """(y, None): a dense FFN has no router output (and does not read the token ids)."""
        a, b = self.w13(x).split(self.ffn, dim=-1)
        return self.w2(F.silu(a) * b), None
