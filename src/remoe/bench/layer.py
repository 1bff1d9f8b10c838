"""MoE layer fwd+bwd micro-benchmark: ours (TopK and ReMoE at target sparsity) vs a dense SwiGLU with the
same active FLOPs (hidden k*ffn) and, when transformers is installed, its Mixtral sparse MoE block with
the same d / ffn / E / k. ReMoE's router is set so ReLU keeps ~k of E gates per token (steady state):
a constant input feature carries a per-expert threshold at the (1 - k/E) quantile of the logits."""

from __future__ import annotations

import torch

from ..model import ModelConfig
from ..model.moe import MoELayer
from ..model.transformer import SwiGLU
from .common import DTYPES, time_fns


def remoe_steady_state(layer: MoELayer, x: torch.Tensor, k: int) -> None:
    with torch.no_grad():
        x[:, 0] = 1.0
        W = layer.router.weight
        W[:, 0] = 0.0
        logits = x @ W.t()
        W[:, 0] = -torch.quantile(logits.float(), 1 - k / W.shape[0], dim=0).to(W.dtype)


def mixtral_block(d: int, ffn: int, E: int, k: int):
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = MixtralConfig(hidden_size=d, intermediate_size=ffn, num_local_experts=E, num_experts_per_tok=k)
    return MixtralSparseMoeBlock(cfg)


def bench_layer(d: int = 512, ffn: int = 1024, E: int = 8, k: int = 1, G: int = 1, tokens: int = 4096,
                precision: str = "fp32", device: str = "cpu", reps: int = 10, mixtral: bool = True) -> dict:
    dev, dtype = torch.device(device), DTYPES[precision]
    torch.manual_seed(0)
    mk = lambda r: MoELayer(ModelConfig(n_layer=1, d_model=d, n_head=8, n_kv_head=8, ffn_hidden=ffn, vocab_size=8,  # noqa: E731
                                        router=r, experts=E, topk=k, granularity=G)).to(dev)
    layers = {"topk": mk("topk"), "remoe": mk("relu"), "dense": SwiGLU(d, k * ffn).to(dev)}
    for m in layers.values():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, d, device=dev)
    remoe_steady_state(layers["remoe"], x, k * G)
    mix = mixtral_block(d, ffn, E, k) if mixtral and G == 1 else None
    if mix is not None:
        layers["mixtral"] = mix.to(dev)

    def step(m):
        def fn():
            xx = x.detach().requires_grad_()
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                y = m(xx[None] if m is mix else xx)
            y = y[0] if isinstance(y, tuple) else y
            y.float().sum().backward()
        return fn

    t = time_fns({n: step(m) for n, m in layers.items()}, dev, reps=reps)
    with torch.no_grad():
        g, _ = layers["remoe"].router(x)
    return {"d": d, "ffn": ffn, "E": E, "k": k, "G": G, "tokens": tokens, "precision": precision, "device": device,
            "seconds": t, "remoe_sparsity": float((g == 0).float().mean()),
            "ratio_topk_vs_dense": t["topk"] / t["dense"], "ratio_remoe_vs_dense": t["remoe"] / t["dense"],
            "speedup_vs_mixtral": (t["mixtral"] / t["topk"]) if "mixtral" in t else None}
