"""Model-level throughput: train (fwd+bwd+AdamW) and inference TFLOPS from FLOPs counted by PyTorch's
FlopCounterMode over one real step, MFU against the matmul peak measured in the same run, and the
paper's Table 7 layout (ReMoE's % difference vs TopK). ReMoE is benchmarked in its steady state: before
timing, it is trained on the benchmark batch with the method's own controller (λ0=1e-3, α=1.5) until
the measured sparsity is within 0.02 of 1 - k/E for 3 steps running."""

from __future__ import annotations

import statistics
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..model import RoutingStats, Transformer, build_method, preset
from ..model.flops import count_flops
from ..train.module import compile_blocks
from ..train.optim import adamw_impl
from .common import DTYPES, matmul_peak, spread, time_fns, time_samples
from .peers import PEERS, build_peer
from .syncs import CountSyncs


def peak_memory_gb(dev: torch.device) -> float | None:
    """Peak allocated memory since the last reset (CUDA only)."""
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None


def calibrate_remoe(model: Transformer, batch: torch.Tensor, max_steps: int = 200) -> float:
    """Train on the batch with the method's controller (lambda0=1e-3, alpha=1.5) until sparsity is within
    0.02 of target 3 steps running. All weights move (hidden states must develop the shared direction
    that lets ReLU zero gates; a router-only fit cannot), which changes no shape, so no cost, of the
    timed steps. Expert stages routing over 2 pairs per token (the dense start) recompute in backward, as
    training's moe_recompute_above does: E=64 at 182m, batch 4x1024, does not fit 140 GB otherwise."""
    stages = {m: m.recompute_above for m in model.modules() if hasattr(m, "recompute_above")}
    for m in stages:
        m.recompute_above = 2
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    method = build_method(model.cfg, lambda0=1e-3, alpha=1.5)
    s, ok = 0.0, 0
    for i in range(max_steps):
        model.reset_routing_counts()
        out = model(batch[:, :-1])
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss = lm + method.coefficient() * method.loss(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = RoutingStats(i, *(t.cpu().numpy() for t in model.routing_counts()))
        s = stats.sparsity
        ok = ok + 1 if abs(s - model.cfg.target_sparsity) < 0.02 else 0
        if ok == 3:
            break
        method.on_optimizer_step(stats, model)
    model.reset_routing_counts()
    for m, before in stages.items():
        m.recompute_above = before
    return s


def count_syncs(step, dev: torch.device) -> dict:
    """Host syncs of one call of `step`: the ops that would force one (syncs.CountSyncs, any device) and,
    on CUDA, the synchronizing operations torch.cuda.set_sync_debug_mode reports."""
    cuda = dev.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with CountSyncs() as syncs:
                step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    reported = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
    return {"host_syncs": syncs.total, "host_sync_ops": dict(syncs.counts), "cuda_syncs_reported": reported}


def build_bench_model(name: str, size: str, vocab: int, seq: int | None, dev: torch.device, **moe):
    """(model, routing method or None, its config) for one row: our Transformer of a routing method, or a
    peer (bench/peers.py) at the widths of our model of the same kind (Llama: dense; Mixtral: TopK)."""
    if name in PEERS:
        cfg = preset(size, "dense" if name == "hf_llama" else "topk", vocab_size=vocab, **moe)
        peer = build_peer(name, cfg, seq or cfg.max_seq_len)
        return (None if peer is None else peer.to(dev)), None, cfg
    cfg = preset(size, name, vocab_size=vocab, **moe)
    return Transformer(cfg).to(dev), build_method(cfg), cfg


class Bench(NamedTuple):
    """One row's model and its steps, as bench_models times them."""
    model: torch.nn.Module
    cfg: object
    routed: bool
    tokens: int
    sparsity: float | None
    train_step: object
    infer_step: object


def prepare(name: str, size: str, vocab: int, batch: int, seq: int | None, dev: torch.device,
            dtype: torch.dtype, compile: bool = False, **moe) -> Bench | None:
    """Build, calibrate (ReMoE: its steady state), and return the train (fwd + bwd + AdamW) and inference steps;
    None for a peer whose library is not installed."""
    torch.manual_seed(0)
    model, method, cfg = build_bench_model(name, size, vocab, seq, dev, **moe)
    if model is None:
        return None
    S = seq or cfg.max_seq_len
    ids = torch.randint(0, vocab, (batch, S + 1), device=dev)
    sparsity = calibrate_remoe(model, ids) if name == "remoe" else None
    if compile and method is not None:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_impl("auto", list(model.parameters())))
    routed = method is not None and method.moe

    def train_step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(ids[:, :-1])
            lm = F.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss = lm + 0.0 * method.loss(out) if routed else lm  # every router weight in the graph
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            model(ids[:, :-1])

    return Bench(model, cfg, routed, batch * S, sparsity, train_step, infer_step)


def bench_models(size: str = "tiny", experts: int = 8, topk: int = 1, granularity: int = 1,
                 precision: str = "bf16", device: str = "cpu", batch: int = 8, seq: int | None = None,
                 reps: int = 5, vocab: int = 4096, models=("dense", "topk", "remoe"), compile: bool = False,
                 peak: float | None = None) -> dict:
    """One row per model: train/infer tokens/s, TFLOPS, MFU, peak memory and host syncs per train step.
    models: routing methods and peers (bench/peers.py PEERS). compile: torch.compile each of our blocks (as
    compile=true trains; peers stay eager). ReMoE runs with bounded dispatch on CUDA (as training's
    moe_dispatch=auto); its FLOPs are counted with the exact plan (the bound's padding rows are not work)."""
    dev, dtype = torch.device(device), DTYPES[precision]
    peak = peak or matmul_peak(dev, dtype)
    rows = []
    for name in models:
        b = prepare(name, size, vocab, batch, seq, dev, dtype, compile, experts=experts, topk=topk,
                    granularity=granularity)
        if b is None:  # a peer whose library is not installed
            continue
        model, train_step, infer_step, tokens = b.model, b.train_step, b.infer_step, b.tokens
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the timed steps' peak, not the calibration's
        model.train()
        train_flops = count_flops(train_step)
        model.eval()
        infer_flops = count_flops(infer_step)
        model.train()
        if isinstance(model, Transformer):
            model.set_pair_capacity(dev.type == "cuda")  # after counting: FLOPs of routed pairs only
        train_step()  # sizes the bounded capacities (an exact first forward) and, compiled, compiles
        syncs = count_syncs(train_step, dev)
        train_samples = time_samples({"t": train_step}, dev, reps=reps)["t"]
        t_train = statistics.median(train_samples)
        model.eval()
        t_infer = time_fns({"t": infer_step}, dev, reps=reps)["t"]
        routed, cfg, sparsity = b.routed, b.cfg, b.sparsity
        S = tokens // batch
        rows.append({"model": name, "size": size, "experts": experts if routed or name == "hf_mixtral" else None,
                     "granularity": granularity if routed else None, "topk": topk, "device": device,
                     "precision": precision, "batch": batch, "seq": S, "vocab": cfg.padded_vocab_size,
                     "compile": bool(compile and name not in PEERS),
                     "params": sum(p.numel() for p in model.parameters()), "tokens": tokens,
                     "remoe_sparsity": sparsity,
                     "train_tokens_per_s": tokens / t_train, "infer_tokens_per_s": tokens / t_infer,
                     "train_tflops": train_flops / t_train / 1e12,
                     "infer_tflops": infer_flops / t_infer / 1e12,
                     "train_mfu": train_flops / t_train / peak, "infer_mfu": infer_flops / t_infer / peak,
                     "reps": reps, "train_spread": spread(train_samples),
                     "peak_memory_gb": peak_memory_gb(dev), **syncs,
                     "pair_overflows": getattr(model, "pair_overflows", None)})
        b = model = train_step = infer_step = None  # freed before the next model is built: E=64 at
        if dev.type == "cuda":                          # 182m is 5.5B parameters, 87 GB with AdamW's state
            torch.cuda.empty_cache()
    by = {r["model"]: r for r in rows}
    if "topk" in by and "remoe" in by:
        for key, col in (("train_diff", "train_tflops"), ("infer_diff", "infer_tflops")):
            by["remoe"][key] = f"{100 * (by['remoe'][col] / by['topk'][col] - 1):+.2f}%"
    if "dense" in by:
        for r in rows:
            r["train_vs_dense"] = r["train_tokens_per_s"] / by["dense"]["train_tokens_per_s"]
    return {"peak_tflops": peak / 1e12, "rows": rows}


def paper_table(result: dict) -> str:
    lines = [f"matmul peak measured here: {result['peak_tflops']:.3f} TFLOPS",
             "| model | train TFLOPS | train diff | train MFU | infer TFLOPS | infer diff "
             "| tokens/s (train) | vs dense | host syncs/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        vs = f"{r['train_vs_dense']:.2f}x" if "train_vs_dense" in r else ""
        lines.append(f"| {r['model']}{' (compiled)' if r.get('compile') else ''} | {r['train_tflops']:.3f} | "
                     f"{r.get('train_diff', '')} | {100 * r['train_mfu']:.1f}% | {r['infer_tflops']:.3f} | "
                     f"{r.get('infer_diff', '')} | {r['train_tokens_per_s']:.0f} | {vs} | {r.get('host_syncs', '')} |")
    return "\n".join(lines)
