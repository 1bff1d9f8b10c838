"""Peers timed beside our models in the same process: HF transformers' LlamaForCausalLM (the dense model)
and MixtralForCausalLM (its sparse MoE, experts through torch._grouped_mm) at the widths of one of our
ModelConfigs: same depth, width, heads, K/V heads, (expert) FFN width, vocabulary, RoPE base and norm eps,
untied head, no biases, so their parameter counts equal ours (checked where they are built). Mixtral is
TopK with k experts and its softmax renormalised over the chosen ones; its router aux loss is off
(output_router_logits=False) as ours is not in the timed step's graph either (x 0)."""

from __future__ import annotations

import torch
from torch import nn

from ..model import ModelConfig

PEERS = ("hf_llama", "hf_mixtral")


class HFPeer(nn.Module):
    """forward(ids) -> an object with .logits (what the benchmark's step reads), like our Transformer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model

    def forward(self, ids: torch.Tensor):
        return self.hf(input_ids=ids, use_cache=False)


def build_peer(name: str, cfg: ModelConfig, seq: int) -> HFPeer | None:
    """The peer `name` at cfg's widths, or None where transformers (or that model) is not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    except ImportError:
        return None
    common = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, vocab_size=cfg.padded_vocab_size,
                  max_position_embeddings=max(seq, cfg.max_seq_len), rope_theta=cfg.rope_base,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attention_dropout=0.0,
                  initializer_range=cfg.init_std)
    if name == "hf_llama":
        conf = LlamaConfig(intermediate_size=cfg.ffn * cfg.ffn_mult, mlp_bias=False, attention_bias=False,
                           **common)
        conf._attn_implementation = "sdpa"
        model = LlamaForCausalLM(conf)
    elif name == "hf_mixtral":
        conf = MixtralConfig(intermediate_size=cfg.expert_ffn, num_local_experts=cfg.n_experts,
                             num_experts_per_tok=cfg.n_active, output_router_logits=False, router_jitter_noise=0.0,
                             **common)
        conf._attn_implementation = "sdpa"
        conf._experts_implementation = "grouped_mm"
        model = MixtralForCausalLM(conf)
    else:
        raise ValueError(f"unknown peer {name!r} (one of {', '.join(PEERS)})")
    return HFPeer(model)
