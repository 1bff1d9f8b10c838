"""The GPU suite (`python src/bench.py gpu`): one CUDA GPU, at most about 8 minutes, one JSON written after
each part (a run stopped at a time limit keeps every part it finished). Parts, in order:

  checks    the expert stage's fast path against its reference: `torch._grouped_mm` (CUDA bf16) vs the
            per-expert `mm` loop, outputs and every gradient (x, w13, w2, gates), at several (E, k, G).
  syncs     host syncs in one training step of every routing method (bench.syncs.CountSyncs and, on
            CUDA, torch.cuda.set_sync_debug_mode): the fixed-k methods must have none.
  paper     the paper's micro-batch (16 x 1024) and vocabulary (GPT-2, padded) at E=8: dense, TopK,
            ReMoE (steady state, bounded dispatch), and HF transformers' Llama and Mixtral (grouped_mm
            experts) of the same widths as peers; each of ours profiled (GPU busy/idle, top kernels).
  base      the earlier setting (4 x 1024, vocabulary 4096) at --configs E:k:G, comparable with old JSONs.
  e64       the paper setting at E=64 (TopK, ReMoE) against the paper part's dense row.
  compiled  the paper setting at E=8 with compile=true (our models; the peers stay eager).
Every row: tokens/s, TFLOPS from FLOPs PyTorch counts, MFU against a matmul peak measured in the same
process, peak memory, host syncs per step, ratios to dense. `reports/bench/gpu_<device>.json`.

The same code runs on CPU with small settings (`--device cpu --size tiny`): the tests run it that way,
so argument handling, the checks, every part and the table writing are exercised without a GPU.
"""

from __future__ import annotations

import time

import torch

from ..model import METHODS, ModelConfig, Transformer, build_method, preset
from ..model import experts as experts_mod
from ..model.dispatch import group_by_expert
from .common import DTYPES, matmul_peak
from .model import bench_models, count_syncs, paper_table, prepare
from .profile import profile_train

PARTS = ("checks", "syncs", "paper", "base", "e64", "compiled")
GPT2_VOCAB = 50257  # padded by the model to its vocab_multiple (ModelConfig.padded_vocab_size)
CONFIGS = ((8, 1, 1),)  # (E, k, G) of the base part
CHECKS = ((8, 1, 1), (8, 2, 1), (64, 1, 8))  # (E, k, G) of the grouped-GEMM check
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # relative error, fast path vs loop


def parse_config(text: str) -> tuple[int, int, int]:
    """"E:k:G" -> (E, k, G)."""
    try:
        E, k, G = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--configs: {text!r} is not E:k:G (e.g. 64:1:8)") from None
    if min(E, k, G) < 1 or k > E:
        raise ValueError(f"--configs: {text!r} needs E, k, G >= 1 and k <= E")
    return E, k, G


def check_grouped_mm(device: str, precision: str, E: int, k: int, G: int, d: int = 256, ffn: int = 1024,
                     tokens: int = 2048) -> dict:
    """The expert stage through torch._grouped_mm vs the per-expert loop: relative error of the output
    and of every gradient (the loop is the reference: one plain mm per expert)."""
    dev, dtype = torch.device(device), DTYPES[precision]
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, d_model=d, n_head=4, n_kv_head=4, ffn_hidden=ffn, vocab_size=10, routing="topk",
                      experts=E, topk=k, granularity=G)
    layer = METHODS["topk"].build_ffn(cfg).to(dev)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(tokens, d, device=dev)
    w = torch.randn(tokens, d, device=dev)

    calls, fell_back = [], []
    grouped_mm = getattr(torch, "_grouped_mm", None)

    def counting(*args, **kwargs):  # which path ran: the check must not compare a path with itself
        calls[-1] += 1
        return grouped_mm(*args, **kwargs)

    def run(loop: bool) -> list[torch.Tensor]:
        keys = {(dev.type, dtype, "mm"), (dev.type, dtype, "wgrad")}
        saved = set(experts_mod._GMM_BROKEN)
        if loop:
            experts_mod._GMM_BROKEN.update(keys)  # the per-expert mm loop, as where _grouped_mm is missing
        calls.append(0)
        if grouped_mm is not None:
            torch._grouped_mm = counting
        try:
            layer.zero_grad()
            xx = x.clone().requires_grad_()
            gates = layer.router(xx).gates.detach().requires_grad_()
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                y = layer.experts(xx, group_by_expert(gates))
            (y.float() * w).sum().backward()
            return [y.detach().float(), xx.grad.float(), gates.grad.float(),
                    *(p.grad.float() for p in layer.experts.parameters())]
        finally:
            fell_back.append(sorted(str(key) for key in experts_mod._GMM_BROKEN - saved))  # raised: loop ran
            experts_mod._GMM_BROKEN.clear()
            experts_mod._GMM_BROKEN.update(saved)
            if grouped_mm is not None:
                torch._grouped_mm = grouped_mm

    fast, loop = run(False), run(True)
    names = ["output", "grad x", "grad gates", "grad w13", "grad w2"]
    rel = {n: float((a - b).norm() / b.norm().clamp_min(1e-30)) for n, a, b in zip(names, fast, loop)}
    # ok needs the fast path to have run without falling back, else it was compared with itself
    ok = all(v <= TOL[dtype] for v in rel.values()) and calls[0] > 0 and not fell_back[0] and calls[1] == 0
    return {"E": E, "k": k, "G": G, "precision": precision, "grouped_mm_calls": calls[0],
            "loop_grouped_mm_calls": calls[1], "fast_path_fell_back": fell_back[0], "rel_err": rel,
            "tolerance": TOL[dtype], "ok": ok}


def routing_syncs(device: str, size: str, precision: str, tokens: int = 512) -> list[dict]:
    """Host syncs in the second training step (the first sizes ReMoE's capacities) of every routing method."""
    dev, dtype = torch.device(device), DTYPES[precision]
    rows = []
    for method in METHODS:
        torch.manual_seed(0)
        cfg = preset(size, method, vocab_size=4096, experts=8)
        model = Transformer(cfg).to(dev)
        model.set_pair_capacity(dev.type == "cuda")
        routing = build_method(cfg)
        seq = min(cfg.max_seq_len, tokens)
        ids = torch.randint(0, 4096, (max(1, tokens // seq), seq + 1), device=dev)

        def step(model=model, ids=ids, routing=routing):  # this method's, bound now
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten())
                if routing.moe:
                    loss = loss + routing.coefficient() * routing.loss(out)
            loss.backward()

        step()
        rows.append({"method": method, **count_syncs(step, dev)})
        model = None
    return rows


def _throughput(out: dict, label: str, res: dict, E: int, k: int, G: int) -> None:
    """One bench_models result into the suite's throughput list, with its setting and peak memory."""
    peaks = [r["peak_memory_gb"] for r in res["rows"] if r["peak_memory_gb"] is not None]
    res["peak_memory_gb"] = max(peaks, default=None)  # each row's: its timed steps (bench_models resets)
    res["config"] = {"experts": E, "topk": k, "granularity": G}
    res["setting"] = label
    out["throughput"].append(res)


def _paper_part(out: dict, paper: dict, dev: torch.device, dtype: torch.dtype) -> None:
    """The paper's setting (E=8, k=1) beside Hugging Face's Llama and Mixtral; where each of ours spends its step."""
    res = bench_models(experts=8, topk=1, granularity=1, models=("dense", "topk", "remoe", "hf_llama", "hf_mixtral"),
                       **paper)
    _throughput(out, "paper", res, 8, 1, 1)
    for name in ("dense", "topk", "remoe"):
        b = prepare(name, paper["size"], paper["vocab"], paper["batch"], paper["seq"], dev, dtype, experts=8)
        b.model.set_pair_capacity(dev.type == "cuda")
        b.train_step()
        out["profiles"][name] = {**profile_train(b.train_step, dev), **count_syncs(b.train_step, dev)}
        b = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _e64_part(out: dict, paper: dict) -> None:
    """E=64 at the paper's batch, each row against the paper part's dense row (same batch, vocabulary, process)."""
    res = bench_models(experts=64, topk=1, granularity=1, models=("topk", "remoe"), **paper)
    dense = next((r for t in out["throughput"] if t["setting"] == "paper" for r in t["rows"]
                  if r["model"] == "dense"), None)
    if dense:
        for r in res["rows"]:
            r["train_vs_dense"] = r["train_tokens_per_s"] / dense["train_tokens_per_s"]
    _throughput(out, "e64", res, 64, 1, 1)


def run_suite(device: str = "cuda", size: str = "182m", precision: str = "bf16", batch: int = 4,
              seq: int | None = None, reps: int = 3, configs=CONFIGS, checks=CHECKS, on_part=None,
              parts=PARTS, paper_batch: int = 16, paper_vocab: int = GPT2_VOCAB) -> dict:
    """The parts in order; every finished part is in the returned dict, and on_part(dict) is called after
    each (the caller writes it there, so a run stopped at a time limit keeps what it finished)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (run the suite's CPU path with --device cpu)")
    dev, dtype = torch.device(device), DTYPES[precision]
    out = {"device": device, "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "size": size, "precision": precision, "batch": batch, "seq": seq, "paper_batch": paper_batch,
           "paper_vocab": paper_vocab, "parts": list(parts), "checks": [], "syncs": [], "throughput": [],
           "profiles": {}, "wall_s": {}}
    peak = matmul_peak(dev, dtype)
    paper = dict(size=size, precision=precision, device=device, batch=paper_batch, seq=seq, reps=reps,
                 vocab=paper_vocab, peak=peak)

    def base_part():
        for E, k, G in configs:
            _throughput(out, "base", bench_models(size, experts=E, topk=k, granularity=G, precision=precision,
                                                  device=device, batch=batch, seq=seq, reps=reps, peak=peak), E, k, G)

    run = {
        "checks": lambda: out["checks"].extend(check_grouped_mm(device, precision, E, k, G) for E, k, G in checks),
        "syncs": lambda: out["syncs"].extend(routing_syncs(device, size, precision)),
        "paper": lambda: _paper_part(out, paper, dev, dtype),
        "base": base_part,
        "e64": lambda: _e64_part(out, paper),
        "compiled": lambda: _throughput(out, "compiled", bench_models(
            experts=8, topk=1, granularity=1, models=("dense", "topk", "remoe"), compile=True, **paper), 8, 1, 1),
    }
    for name in PARTS:  # in this order
        if name in parts:
            t = time.time()
            run[name]()
            out["wall_s"][name] = time.time() - t
            if on_part:
                on_part(out)
    return out


def table(result: dict) -> str:
    """The checks, then one Table-7-style table per (E, k, G)."""
    lines = [f"GPU suite on {result['device_name']} ({result['precision']}, {result['size']}; paper setting "
             f"{result.get('paper_batch')} x {result.get('seq') or 'max'} tokens, vocabulary "
             f"{result.get('paper_vocab')}; base batch {result['batch']})", "",
             "| E | k | G | grouped_mm calls | " + " | ".join(
                 f"rel err {n}" for n in ("output", "grad x", "grad gates", "grad w13", "grad w2")) + " | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        errs = " | ".join(f"{v:.2e}" for v in c["rel_err"].values())
        lines.append(f"| {c['E']} | {c['k']} | {c['G']} | {c['grouped_mm_calls']} | {errs} | {c['ok']} |")
    if result.get("syncs"):
        lines += ["", "| method | host syncs in a training step | ops | CUDA syncs reported |", "|---|---|---|---|"]
        for r in result["syncs"]:
            lines.append(f"| {r['method']} | {r['host_syncs']} | {r['host_sync_ops'] or ''} | "
                         f"{'' if r['cuda_syncs_reported'] is None else r['cuda_syncs_reported']} |")
    for res in result["throughput"]:
        cfg = res["config"]
        mem = res.get("peak_memory_gb")
        lines += ["", f"{res.get('setting', '')}: E={cfg['experts']}, k={cfg['topk']}, G={cfg['granularity']}"
                  + (f"; peak memory {mem:.1f} GiB" if mem is not None else ""), paper_table(res)]
    for name, p in result.get("profiles", {}).items():
        busy = "" if p["busy_ms"] is None else (f", GPU busy {p['busy_ms']:.1f} ms, idle "
                                                f"{100 * p['idle_fraction']:.0f}%")
        lines += ["", f"profile {name}: step {p['wall_ms']:.1f} ms{busy}, {p['host_syncs']} host syncs; top "
                  f"({p['measured_as']}):"]
        lines += [f"  {k['ms']:8.2f} ms {100 * k['share']:5.1f}%  {k['name']}" for k in p["top"]]
    return "\n".join(lines)
