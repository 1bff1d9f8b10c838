"""The GPU suite (`python src/bench.py gpu`): one CUDA GPU, about 8 minutes, one JSON.

1. The expert stage's fast path against its reference: `torch._grouped_mm` (CUDA bf16) vs the
   per-expert `mm` loop, outputs and every gradient (x, w13, w2, gates), at several (E, k, G).
2. Training and inference steps of the 182m preset (dense, TopK, ReMoE in its steady state) in bf16 at
   E=8, then E=64 with G=1 and G=8: tokens/s, TFLOPS from FLOPs PyTorch counts, MFU against a matmul
   peak measured in the same process, and peak memory.
3. `reports/bench/gpu_<device>.json` (rows, checks, environment, wall time of each part) and the
   paper's Table 7 layout printed.

The same code runs on CPU with small settings (`--device cpu --size tiny`): the tests run it that way,
so argument handling, the checks and the table writing are exercised without a GPU.
"""

from __future__ import annotations

import time

import torch

from ..model import METHODS, ModelConfig
from ..model import experts as experts_mod
from ..model.dispatch import group_by_expert
from .common import DTYPES
from .model import bench_models, paper_table

CONFIGS = ((8, 1, 1), (64, 1, 1), (64, 1, 8))  # (E, k, G) of the throughput part
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


def run_suite(device: str = "cuda", size: str = "182m", precision: str = "bf16", batch: int = 4,
              seq: int | None = None, reps: int = 3, configs=CONFIGS, checks=CHECKS,
              on_part=None) -> dict:
    """Both parts; every finished part is in the returned dict, and on_part(dict) is called after each
    (the caller writes it there, so a run stopped at a time limit keeps what it finished)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (run the suite's CPU path with --device cpu)")
    out = {"device": device, "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "size": size, "precision": precision, "batch": batch, "seq": seq, "checks": [], "throughput": [],
           "wall_s": {}}
    t = time.time()
    for E, k, G in checks:
        out["checks"].append(check_grouped_mm(device, precision, E, k, G))
    out["wall_s"]["checks"] = time.time() - t
    if on_part:
        on_part(out)
    for E, k, G in configs:
        t = time.time()
        res = bench_models(size, experts=E, topk=k, granularity=G, precision=precision, device=device,
                           batch=batch, seq=seq, reps=reps)
        peaks = [r["peak_memory_gb"] for r in res["rows"] if r["peak_memory_gb"] is not None]
        res["peak_memory_gb"] = max(peaks, default=None)  # each row's: its timed steps (bench_models resets)
        res["config"] = {"experts": E, "topk": k, "granularity": G}
        out["throughput"].append(res)
        out["wall_s"][f"E{E}k{k}G{G}"] = time.time() - t
        if on_part:
            on_part(out)
    return out


def table(result: dict) -> str:
    """The checks, then one Table-7-style table per (E, k, G)."""
    lines = [f"GPU suite on {result['device_name']} ({result['precision']}, {result['size']}, batch "
             f"{result['batch']})", "", "| E | k | G | grouped_mm calls | " + " | ".join(
                 f"rel err {n}" for n in ("output", "grad x", "grad gates", "grad w13", "grad w2")) + " | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        errs = " | ".join(f"{v:.2e}" for v in c["rel_err"].values())
        lines.append(f"| {c['E']} | {c['k']} | {c['G']} | {c['grouped_mm_calls']} | {errs} | {c['ok']} |")
    for res in result["throughput"]:
        cfg = res["config"]
        mem = res.get("peak_memory_gb")
        lines += ["", f"E={cfg['experts']}, k={cfg['topk']}, G={cfg['granularity']}"
                  + (f"; peak memory {mem:.1f} GiB" if mem is not None else ""), paper_table(res)]
    return "\n".join(lines)
