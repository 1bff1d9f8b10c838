"""MoE layer fwd+bwd micro-benchmark: ours (TopK and ReMoE at target sparsity) vs a dense SwiGLU with the
same active FLOPs (hidden k*ffn) and, when transformers is installed, its Mixtral sparse MoE block with
the same d / ffn / E / k. ReMoE's router is set so ReLU keeps ~k of E gates per token (steady state):
a constant input feature carries a per-expert threshold at the (1 - k/E) quantile of the logits."""

from __future__ import annotations

import torch

from ..model import METHODS, ModelConfig
from ..model.experts import SwiGLU
from ..model.moe import MoELayer
from ..model.stats import layer_sparsity
from .common import DTYPES, time_fns


def remoe_steady_state(layer: MoELayer, x: torch.Tensor, k: int) -> None:
    with torch.no_grad():
        x[:, 0] = 1.0
        W = layer.router.weight
        W[:, 0] = 0.0
        logits = x @ W.t()
        W[:, 0] = -torch.quantile(logits.float(), 1 - k / W.shape[0], dim=0).to(W.dtype)


def mixtral_block(d: int, ffn: int, E: int, k: int, like: MoELayer, impl: str = "eager"):
    """transformers' MixtralSparseMoeBlock with `impl` experts ("eager" loop: the default; "grouped_mm"),
    holding the weights of our TopK layer `like` (its parameters are created uninitialised)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = MixtralConfig(hidden_size=d, intermediate_size=ffn, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():  # same router and experts: Mixtral stores (E, 2f, d) gate|up and (E, d, f) down
        block.gate.weight.copy_(like.router.weight)
        block.experts.gate_up_proj.copy_(like.experts.w13.transpose(1, 2))
        block.experts.down_proj.copy_(like.experts.w2.transpose(1, 2))
    return block


def bench_layer(d: int = 512, ffn: int = 1024, E: int = 8, k: int = 1, G: int = 1, tokens: int = 4096,
                precision: str = "fp32", device: str = "cpu", reps: int = 10, mixtral: bool = True) -> dict:
    dev, dtype = torch.device(device), DTYPES[precision]
    torch.manual_seed(0)
    def mk(method: str) -> MoELayer:
        cfg = ModelConfig(n_layer=1, d_model=d, n_head=8, n_kv_head=8, ffn_hidden=ffn, vocab_size=8,
                          routing=method, experts=E, topk=k, granularity=G)
        return METHODS[method].build_ffn(cfg).to(dev)

    layers = {"topk": mk("topk"), "remoe": mk("remoe"), "dense": SwiGLU(d, k * ffn).to(dev)}
    for m in layers.values():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, d, device=dev)
    remoe_steady_state(layers["remoe"], x, k * G)
    mixes = []
    if mixtral and G == 1:  # Mixtral has no fine-grained experts
        for name, impl in (("mixtral", "eager"), ("mixtral_gmm", "grouped_mm")):
            block = mixtral_block(d, ffn, E, k, like=layers["topk"], impl=impl)
            if block is not None:
                layers[name] = block.to(dev)
                mixes.append(block)

    def step(m):
        def fn():
            m.zero_grad(set_to_none=True)  # as a training step does: the backward writes fresh grads
            xx = x.detach().requires_grad_()
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                y = m(xx[None] if m in mixes else xx)
            y = y[0] if isinstance(y, tuple) else y
            y.float().sum().backward()
        return fn

    t = time_fns({n: step(m) for n, m in layers.items()}, dev, reps=reps)
    with torch.no_grad():
        nnz = (layers["remoe"].router(x).gates > 0).sum(0)
    return {"d": d, "ffn": ffn, "E": E, "k": k, "G": G, "tokens": tokens, "precision": precision,
            "device": device,
            "seconds": t, "remoe_sparsity": float(layer_sparsity(nnz[None], [tokens])[0]),
            "ratio_topk_vs_dense": t["topk"] / t["dense"], "ratio_remoe_vs_dense": t["remoe"] / t["dense"],
            "speedup_vs_mixtral": (t["mixtral"] / t["topk"]) if "mixtral" in t else None,
            "speedup_vs_mixtral_gmm": (t["mixtral_gmm"] / t["topk"]) if "mixtral_gmm" in t else None}
