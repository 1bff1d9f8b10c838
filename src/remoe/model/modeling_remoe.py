"""Hugging Face transformers wrapper around remoe's Transformer, for exported models (export.py).

The model math is not copied by hand: the export writes this file beside remoe's own model modules
(transformer.py, routers.py, experts.py, ...), which it imports relatively, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` runs exactly the code that trained
the model. Outputs: logits over the padded vocabulary, the loss when `labels` are given, and with
`output_router_logits=True` every MoE layer's gates (tokens, E*G) in `router_logits` (zeros = not routed),
so sparsity can be measured outside this project. No KV cache (generation recomputes the prefix); no
padding mask: right padding is harmless to a causal model, left padding is refused. Expert Choice
routing is not causal across the batch: a token's experts depend on the other tokens it is run with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import ModelConfig
from .configuration_remoe import RemoeConfig
from .moe import MoELayer
from .transformer import Transformer, rope_cache


class RemoePreTrainedModel(PreTrainedModel):
    config_class = RemoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        """Only what a checkpoint does not hold: the RoPE tables and the routing counters (non-persistent
        buffers, left uninitialised when transformers loads on the meta device). Parameters and the router
        state (hash table, expert bias) come from the weights; a fresh model gets remoe's own init."""
        with torch.no_grad():
            if isinstance(module, Transformer):
                cos, sin = rope_cache(module.cfg)
                module.rope_cos.copy_(cos.to(module.rope_cos.dtype))
                module.rope_sin.copy_(sin.to(module.rope_sin.dtype))
            elif isinstance(module, MoELayer):
                module.reset_stats()


class RemoeForCausalLM(RemoePreTrainedModel, GenerationMixin):
    def __init__(self, config: RemoeConfig):
        super().__init__(config)
        self.model = Transformer(ModelConfig.from_dict(config.remoe))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_emb

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, output_router_logits: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> MoeCausalLMOutputWithPast:
        if attention_mask is not None and bool((attention_mask.diff(dim=-1) > 0).any()):
            raise ValueError("remoe models have no padding mask: pad on the right (left padding shifts the "
                             "positions of the real tokens)")
        out = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        want = self.config.output_router_logits if output_router_logits is None else output_router_logits
        return MoeCausalLMOutputWithPast(loss=loss, logits=out.logits,
                                         router_logits=tuple(r.gates for r in out.routing) if want else None)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
