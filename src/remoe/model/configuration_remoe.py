"""Hugging Face config of an exported remoe model (export.py): `remoe` holds the ModelConfig (the
architecture, routing method included); the usual transformers names mirror it for tools that read them."""

from __future__ import annotations

from transformers import PretrainedConfig

from .config import ModelConfig


class RemoeConfig(PretrainedConfig):
    model_type = "remoe"

    def __init__(self, remoe: dict | None = None, output_router_logits: bool = False, **kwargs):
        self.remoe = dict(remoe or ModelConfig().to_dict())
        c = ModelConfig.from_dict(self.remoe)  # validates
        self.vocab_size = c.padded_vocab_size
        self.hidden_size = c.d_model
        self.num_hidden_layers = c.n_layer
        self.num_attention_heads = c.n_head
        self.num_key_value_heads = c.n_kv_head
        self.max_position_embeddings = c.max_seq_len
        self.intermediate_size = c.ffn * c.ffn_mult
        self.rope_theta = c.rope_base
        self.rms_norm_eps = c.norm_eps
        self.routing = c.routing
        self.num_local_experts = c.n_experts if c.is_moe else None
        self.num_experts_per_tok = c.n_active if c.is_moe else None
        self.output_router_logits = output_router_logits
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("use_cache", False)  # no KV cache: every step recomputes the prefix
        super().__init__(**kwargs)
