"""The LLaMA-style decoder shared by every routing method (the paper's backbone, Sec. 4 / Table 1).

Pre-norm blocks: RMSNorm -> causal GQA attention with RoPE -> residual; RMSNorm -> FFN -> residual.
The FFN is built by the config's routing method: a SwiGLU (dense, optionally ffn_mult x wider) or an
MoELayer with the method's router. No biases, no dropout, untied embedding and head, weights initialised
N(0, init_std) except each block's output projections (attention wo, FFN/expert W2) at init_std/sqrt(2 L)
as the official Megatron code does (scaled_output_init; off: all at init_std). The forward returns the logits and
every MoE layer's router output (gates),
from which the routing method computes its loss and the analyses read the routing.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .moe import MoELayer, PairCapacity
from .routers import RouterOutput
from .routing import RoutingMethod, method_of

log = logging.getLogger("remoe")


def rope_cache(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout (Megatron/HF LLaMA)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, hd); cos/sin: (S, hd)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv = cfg.n_kv_head * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, kv, bias=False)
        self.wv = nn.Linear(cfg.d_model, kv, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, method: type[RoutingMethod]):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = method.build_ffn(cfg)

    def forward(self, x, cos, sin, idx) -> tuple[torch.Tensor, RouterOutput | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        y, routed = self.ffn(self.ffn_norm(x), idx)
        return x + y, routed


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    routing: tuple[RouterOutput, ...]  # one per MoE layer, in depth order; () for the dense model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        method = method_of(cfg)  # the routing method's checks of cfg, before anything is built
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, method) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        cos, sin = rope_cache(cfg)
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        self.pair_overflows = 0  # forwards re-run because a bounded layer overflowed (set_pair_capacity)
        self.reset_parameters()

    OUTPUT_PROJECTIONS = (".attn.wo.", ".ffn.w2.", ".ffn.experts.w2")  # what scaled_output_init scales

    def reset_parameters(self) -> None:
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(p)
            elif self.cfg.scaled_output_init and any(k in f".{name}" for k in self.OUTPUT_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=out_std)
            else:
                nn.init.normal_(p, mean=0.0, std=self.cfg.init_std)

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        """Logits and router outputs. With bounded dispatch (set_pair_capacity), every bounded layer's pair
        count is read in one host sync after the blocks; if any exceeded its capacity, the forward runs
        again with the exact plan (routing statistics of the discarded pass undone): no pair is dropped."""
        bounded = [m for m in self.moe_layers() if m.capacity is not None]
        if not bounded:
            return self._forward(idx)
        saved = [(m.routed_counts.clone(), m.tokens_seen.clone()) for m in bounded] if self.training else None
        out = self._forward(idx)
        if all(m.pairs is None for m in bounded):  # fixed-k routing: nothing to check
            return out
        tokens = idx.numel()
        pairs = torch.stack([m.pairs for m in bounded]).tolist()  # the forward's one host sync
        over = [m.capacity.observe(n, tokens, m.rows_used) for m, n in zip(bounded, pairs)]
        if not any(over):
            return out
        self.pair_overflows += 1
        log.info("bounded dispatch: layers %s overflowed their capacity; forward re-run exactly (%d so far)",
                 [i for i, o in enumerate(over) if o], self.pair_overflows)
        for m, (counts, seen) in zip(bounded, saved or []):
            m.routed_counts.copy_(counts)
            m.tokens_seen.copy_(seen)
        for m in bounded:
            m.capacity.exact_next = True
        out = self._forward(idx)
        for m, n in zip(bounded, torch.stack([m.pairs for m in bounded]).tolist()):
            m.capacity.observe(n, tokens, None)
        return out

    def set_pair_capacity(self, on: bool, headroom: float = 0.125) -> None:
        """Bounded dispatch for variable-count routing (ReMoE): no host sync inside the layers (one per forward,
        here). Fixed-k routing never syncs and is unaffected; the numbers are the same either way."""
        for m in self.moe_layers():
            m.capacity = PairCapacity(self.cfg.n_experts, headroom) if on else None
            m.pairs = m.rows_used = None

    def _forward(self, idx: torch.Tensor) -> ModelOutput:
        S = idx.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x = self.tok_emb(idx)
        routing = []
        for block in self.blocks:
            x, routed = block(x, cos, sin, idx)
            if routed is not None:
                routing.append(routed)
        return ModelOutput(self.lm_head(self.norm(x)), tuple(routing))

    # ---- routing statistics (MoE only) -----------------------------------------------------
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def routing_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(routed tokens per expert (L, E), tokens seen per layer (L,)) since the last reset."""
        layers = self.moe_layers()
        return (torch.stack([m.routed_counts for m in layers]), torch.stack([m.tokens_seen for m in layers]))

    def reset_routing_counts(self) -> None:
        for m in self.moe_layers():
            m.reset_stats()


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of `Transformer(cfg)` (tested against the module): total, active per token,
    embedding, non-embedding active."""
    d, V = cfg.d_model, cfg.padded_vocab_size
    embed = 2 * V * d  # untied input embedding and output head
    kv = cfg.n_kv_head * cfg.head_dim
    attn = 2 * d * d + 2 * d * kv  # wq, wo ; wk, wv
    norms = 2 * d
    if cfg.is_moe:
        expert = 3 * d * cfg.expert_ffn
        router = method_of(cfg).router_params(cfg)
        ffn_total = cfg.n_experts * expert + router
        ffn_active = cfg.n_active * expert + router
    else:
        ffn_total = ffn_active = 3 * d * cfg.ffn * cfg.ffn_mult
    L = cfg.n_layer
    total = embed + L * (attn + norms + ffn_total) + d
    active = embed + L * (attn + norms + ffn_active) + d
    return {"total": total, "active": active, "embedding": embed, "non_embedding_active": active - embed}
