"""Before launch: what a configuration needs per GPU under each strategy, whether it fits the cluster,
and how long it takes. `python src/plan.py <the train.py overrides>` prints it; training writes
plan.json into every run folder and, on GPUs, refuses a strategy that does not fit (a config error
naming one that does).

Measured where torch lets us, on CPU, in well under a second of compute: one transformer block and the
output head of the configured widths (d_model, heads, kv heads, one expert's ffn/G units, vocabulary)
run forward and backward at the configured sequence length (batch 1) in the configured precision;
autograd's saved-tensor hooks give the activation bytes kept for backward, PyTorch's FlopCounterMode the
FLOPs. Twice, with 1 and 2 experts per token, which separates what a routed (token, expert) pair costs
from what a token costs. From these:
  activations(micro-batch) = T (head + L block) + L N pair,  N = routed pairs per layer per micro-batch
  FLOPs/token (fwd+bwd)    = head + L (block + n pair),      n = experts per token
with n = k*G in steady state, and for ReMoE's Stage I (ReLU passes about half the gates at init and
more in the first steps) the ceiling n = E*G for memory and n = E*G/2 for time over STAGE1_STEPS steps.
Training state per parameter: fp32 weights + fp32 grads + AdamW's two fp32 moments = 16 bytes under
*-mixed precision (4 bytes each), 8 under bf16-true; DDP keeps all of it on every GPU, FSDP full-shard
divides it by the world size, FSDP hybrid by the GPUs of a node. A GPU fits when state + activations
<= HEADROOM of its memory (the rest: CUDA context, allocator fragmentation, temporary buffers of backward).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .model import METHODS, ModelConfig, Transformer, param_counts
from .model.flops import register_flop_formulas

HEADROOM = 0.85
STAGE1_STEPS = 110  # ReMoE's controller settles in ~90-110 steps at lambda0=1e-8, alpha=1.2
STRATEGIES = ("ddp", "fsdp", "fsdp_hybrid")


def _precision(precision: str) -> tuple[torch.dtype, int]:
    """(compute dtype, bytes per weight) of a Lightning precision string."""
    if precision.startswith("bf16"):
        return torch.bfloat16, 2 if precision == "bf16-true" else 4
    if precision.startswith("16"):
        return torch.float16, 2 if precision == "16-true" else 4
    return torch.float32, 4


def measure(cfg: ModelConfig, seq_len: int, precision: str) -> dict:
    """Per-token and per-pair activation bytes and FLOPs (forward + backward), measured on CPU on one- and
    two-block models of cfg's widths (a TopK FFN standing for any MoE: what a pair costs does not depend on the
    router, nor on E or the depth, so grid points of one width share one measurement)."""
    dtype, _ = _precision(precision)
    base = dataclasses.replace(
        cfg,
        n_layer=1,
        routing="topk" if cfg.is_moe else "dense",
        experts=2,
        topk=1,
        granularity=cfg.granularity if cfg.is_moe else 1,
        ffn_hidden=cfg.expert_ffn * (cfg.granularity if cfg.is_moe else 1),
        capacity_factor=1.0,
        score_func="sigmoid",
        norm_topk_prob=None,
    )
    return dict(_measure(base, seq_len, torch.float32 if dtype == torch.float16 else dtype))  # CPU autocast: bf16 or none


@functools.lru_cache(maxsize=16)
def _measure(base: ModelConfig, seq_len: int, dtype: torch.dtype) -> dict:
    register_flop_formulas()

    def run(n_layer: int, k: int, recompute: bool = False) -> tuple[int, int]:
        one = dataclasses.replace(base, n_layer=n_layer, experts=max(2, k), topk=k)
        torch.manual_seed(0)
        model = Transformer(one)
        for layer in model.moe_layers():
            layer.experts.recompute_above = 0.0 if recompute else None
        ids = torch.randint(0, base.vocab_size, (1, seq_len + 1))
        with FlopCounterMode(display=False) as fc:
            saved = saved_activation_bytes(model, ids, dtype)
        return saved, int(fc.get_total_flops())

    T = seq_len
    with torch.random.fork_rng():  # the caller's RNG state is untouched
        a1, f1 = run(1, 1)
        a2, f2 = run(2, 1)
        a12, f12 = run(1, 2) if base.is_moe else (a1, f1)  # two experts per token: one more pair per token
        # the same with the expert stage recomputed in backward (the Stage I ceiling): what a pair keeps
        r11, r12 = (run(1, 1, True)[0], run(1, 2, True)[0]) if base.is_moe else (a1, a12)
    block_a, block_f = a2 - a1, f2 - f1  # one block with one expert per token (dense: the block)
    head_a, head_f = a1 - block_a, f1 - block_f
    pair_a, pair_f = (a12 - a1) / T, (f12 - f1) / T
    return {
        "seq_len": T,
        "head_bytes_per_token": head_a / T,
        "block_bytes_per_token": block_a / T - pair_a,
        "pair_bytes_recomputed": (r12 - r11) / T,
        "block_bytes_per_token_recomputed": (r11 - head_a) / T - (r12 - r11) / T,
        "pair_bytes": pair_a,
        "head_flops_per_token": head_f / T,
        "block_flops_per_token": block_f / T - pair_f,
        "pair_flops": pair_f,
    }


def saved_activation_bytes(model: Transformer, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> int:
    """Bytes autograd keeps for backward in one training step of `model` on `ids` (then runs backward):
    every distinct storage saved, the parameters' own excepted (they are held anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(ids[:, :-1])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return sum(seen.values())


def activation_bytes(m: dict, L: int, tokens: int, pairs_per_token: float, recompute: bool = False) -> float:
    """Bytes kept for backward; recompute: the expert stage recomputed in backward (GroupedExperts
    .recompute_above), which keeps a pair's routing only, plus one layer's full stage while it is
    recomputed."""
    if not recompute:
        return tokens * (
            m["head_bytes_per_token"] + L * (m["block_bytes_per_token"] + pairs_per_token * m["pair_bytes"])
        )
    kept = tokens * (
        m["head_bytes_per_token"]
        + L * (m["block_bytes_per_token_recomputed"] + pairs_per_token * m["pair_bytes_recomputed"])
    )
    return kept + tokens * pairs_per_token * m["pair_bytes"]


def flops_per_token(m: dict, L: int, pairs_per_token: float) -> float:
    return m["head_flops_per_token"] + L * (m["block_flops_per_token"] + pairs_per_token * m["pair_flops"])


def make_plan(
    cfg: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int,
    global_batch: int,
    max_steps: int,
    precision: str,
    cluster: dict,
    stage1: bool,
    recompute_above: float | None = None,
) -> dict:
    """The plan as a dict (plan.json); `stage1`: the routing method has a dense start (ReMoE);
    recompute_above: the run's moe_recompute_above (experts per token)."""
    counts = param_counts(cfg)
    m = measure(cfg, seq_len, precision)
    memory = _memory(cfg, m, counts["total"], micro_batch * seq_len, precision, cluster, stage1, recompute_above)
    stage1_steps = min(STAGE1_STEPS, max_steps)
    timing = _timing(cfg, m, max_steps * global_batch * seq_len, stage1_steps, stage1_steps * global_batch * seq_len,
                     cluster, stage1)
    if timing["stage1"]:
        timing["stage1"]["activation_gb"] = memory["stage1_act"] / 2**30
    return {
        "params_total": counts["total"],
        "params_active": counts["active"],
        "precision": precision,
        "state_bytes_per_param": memory["state_per_param"],
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "activation_gb_steady": memory["steady_act"] / 2**30,
        "stage1": timing["stage1"],
        "flops_per_token": timing["fpt"],
        "moe_recompute_above": recompute_above,
        "tokens": timing["tokens"],
        "hours": timing["seconds"] / 3600,
        "cluster": dict(cluster),
        "world": memory["world"],
        "headroom": HEADROOM,
        "strategies": memory["strategies"],
        "measured": m,
    }


def _memory(cfg: ModelConfig, m: dict, total_params: int, tokens_mb: int, precision: str, cluster: dict,
            stage1: bool, recompute_above: float | None) -> dict:
    """Training state and activations per GPU under each strategy (the Stage I peak where there is one)."""
    _, wbytes = _precision(precision)
    state_per_param = 4 * wbytes  # weights, grads, two AdamW moments
    gpus, nodes = int(cluster["gpus_per_node"]), int(cluster["nodes"])
    world = gpus * nodes
    mem = float(cluster["gpu_memory_gb"]) * 2**30
    k = cfg.n_active if cfg.is_moe else 0
    steady_act = activation_bytes(m, cfg.n_layer, tokens_mb, k)
    stage1_act = None
    if stage1:
        recompute = recompute_above is not None and cfg.n_experts > recompute_above
        stage1_act = activation_bytes(m, cfg.n_layer, tokens_mb, cfg.n_experts, recompute)
    peak_act = max(steady_act, stage1_act or 0)
    state = total_params * state_per_param
    shards = {"ddp": 1, "fsdp": world, "fsdp_hybrid": gpus}
    strategies = {}
    for s in STRATEGIES:
        per_gpu = state / shards[s] + peak_act
        strategies[s] = {"state_gb": state / shards[s] / 2**30, "peak_gb": per_gpu / 2**30,
                         "fits": per_gpu <= HEADROOM * mem}
    return {"state_per_param": state_per_param, "world": world, "steady_act": steady_act, "stage1_act": stage1_act,
            "strategies": strategies}


def _timing(cfg: ModelConfig, m: dict, tokens: int, stage1_steps: int, stage1_tokens: int, cluster: dict,
            stage1: bool) -> dict:
    """Training FLOPs per token and hours at the cluster's rate; Stage I's all-expert steps counted apart."""
    k = cfg.n_active if cfg.is_moe else 0
    fpt = flops_per_token(m, cfg.n_layer, k)
    world = int(cluster["gpus_per_node"]) * int(cluster["nodes"])
    rate = world * float(cluster["peak_tflops"]) * 1e12 * float(cluster["mfu"])
    seconds = tokens * fpt / rate
    s1 = None
    if stage1:
        s1_fpt = flops_per_token(m, cfg.n_layer, cfg.n_experts / 2)
        s1 = {"steps": stage1_steps, "flops_per_token": s1_fpt, "hours": stage1_tokens * s1_fpt / rate / 3600}
        seconds += stage1_tokens * (s1_fpt - fpt) / rate
    return {"fpt": fpt, "tokens": tokens, "seconds": seconds, "stage1": s1}


def describe(p: dict) -> str:
    c = p["cluster"]
    lines = [
        f"plan: {p['params_total'] / 1e9:.3f}B parameters ({p['params_active'] / 1e6:.1f}M active), "
        f"{p['precision']}: {p['state_bytes_per_param']} bytes/parameter of training state",
        f"cluster: {c['nodes']} node(s) x {c['gpus_per_node']} GPUs x {c['gpu_memory_gb']} GB, "
        f"{c['peak_tflops']} TFLOPS at MFU {c['mfu']}",
        f"activations per micro-batch ({p['micro_batch']} x {p['seq_len']}): "
        f"{p['activation_gb_steady']:.2f} GB steady"
        + (f", {p['stage1']['activation_gb']:.2f} GB in Stage I (all experts)" if p["stage1"] else ""),
        f"training FLOPs/token (fwd+bwd, counted): {p['flops_per_token'] / 1e9:.3f} GFLOP; "
        f"{p['tokens'] / 1e9:.2f}B tokens -> {p['hours']:.1f} h"
        + (f" (Stage I: {p['stage1']['steps']} steps, {p['stage1']['hours']:.2f} h)" if p["stage1"] else ""),
        "| strategy | state/GPU (GB) | peak/GPU (GB) | fits |",
        "|---|---|---|---|",
    ]
    for s, v in p["strategies"].items():
        lines.append(f"| {s} | {v['state_gb']:.1f} | {v['peak_gb']:.1f} | {'yes' if v['fits'] else 'no'} |")
    return "\n".join(lines)


def strategy_of(trainer_cfg) -> str:
    """The plan's name for a trainer config's strategy."""
    s = str(trainer_cfg.get("strategy", "auto")).lower()
    if "fsdp" in s or "modelparallel" in s:
        return "fsdp_hybrid" if "hybrid" in str(trainer_cfg.get("sharding_strategy", "")).lower() else "fsdp"
    return "ddp"


def check_fits(p: dict, strategy: str) -> str | None:
    """None if `strategy` fits, else the error message naming a strategy that would."""
    if p["strategies"][strategy]["fits"]:
        return None
    ok = [s for s, v in p["strategies"].items() if v["fits"]]
    need = p["strategies"][strategy]["peak_gb"]
    have = p["cluster"]["gpu_memory_gb"] * HEADROOM
    hint = (
        f"use {ok[0]} (trainer=fsdp)"
        if ok
        else (
            "no strategy fits: more GPUs, a smaller micro-batch or "
            "model, or moe_recompute_above=<k*G> (Stage I ceiling)"
        )
    )
    return (
        f"the plan needs {need:.1f} GB per GPU under {strategy}, over {have:.1f} GB ({HEADROOM:.0%} of "
        f"{p['cluster']['gpu_memory_gb']} GB): {hint}"
    )


def plan_for(cfg, mcfg: ModelConfig) -> dict:
    """The plan of a composed (validated, derived) config."""
    precision = str(cfg.trainer.precision)
    if precision == "auto":  # what auto chooses on a bf16 GPU (remoe.train.precision)
        precision = "bf16-mixed"
    return make_plan(
        mcfg,
        seq_len=int(cfg.size.seq_len),
        micro_batch=int(cfg.data.micro_batch_size),
        global_batch=int(cfg.size.global_batch_size),
        max_steps=int(cfg.trainer.max_steps),
        precision=precision,
        cluster=dict(cfg.cluster),
        stage1=METHODS[mcfg.routing].dense_start,
        recompute_above=cfg.get("moe_recompute_above"),
    )


def on_gpus(trainer_cfg) -> bool:
    acc = str(trainer_cfg.get("accelerator", "auto"))
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())
