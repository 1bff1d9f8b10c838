"""`precision: auto`: the training precision chosen from the machine, not assumed by a preset.

CPUs differ: one measured here has avx512_bf16/AMX (bf16 matmul 3.7x its fp32), another has neither
(bf16 4.5x SLOWER than fp32), so a preset that says bf16-mixed is right on one and wrong on the other.
On a CUDA device auto is bf16-mixed where the GPU supports bf16 (16-mixed otherwise). On CPU it times
the model's largest GEMM (tokens x d_model @ d_model x 2 ffn, the fused SwiGLU input projection) in
fp32 and in bf16, a few repetitions each (well under a second), and picks bf16-mixed only when bf16 is
at least BF16_MARGIN times faster: autocast adds casts and leaves norms, softmax and routing in fp32,
so a matmul that is barely faster in bf16 makes a step slower.

The choice is cached per machine (CPU model and flags, threads, torch version, shape) in the data
cache folder, so every run of a sweep on one machine trains in the same precision (same config + seed
= same numbers); a resumed run keeps the precision it started with; DDP ranks take rank 0's choice
from the environment (REMOE_PRECISION). The choice, its timings and the CPU flags go into summary.json.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time

from ..io import default_cache_dir, write_json_atomic

log = logging.getLogger("remoe")

AUTO = "auto"
BF16_MARGIN = 1.25
ENV = "REMOE_PRECISION"  # rank 0's resolved choice, inherited by the DDP ranks it launches
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")  # what decides bf16 speed


def cpu_info() -> dict:
    """The CPU model and which of FLAGS it has (Linux /proc/cpuinfo; elsewhere the model only)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "flags": [f for f in FLAGS if f in flags]}


def time_matmul(dtype, m: int, k: int, n: int, reps: int = 5) -> float:
    """Median seconds of an (m, k) @ (k, n) matmul in `dtype` on CPU, after one warm-up."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def decide(fp32_s: float, bf16_s: float) -> str:
    """The CPU rule: bf16-mixed iff bf16 is at least BF16_MARGIN times faster than fp32."""
    return "bf16-mixed" if bf16_s * BF16_MARGIN <= fp32_s else "32-true"


def _cache_path() -> str:
    return os.path.join(default_cache_dir(), "precision.json")


def choose(accelerator: str, d_model: int, ffn: int, tokens: int = 512) -> dict:
    """The precision for this machine: {"precision", "reason", ...timings, "cpu"}."""
    import torch

    cpu = cpu_info()
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"precision": "bf16-mixed" if bf16 else "16-mixed", "cpu": cpu,
                "reason": f"CUDA device {torch.cuda.get_device_name()}: "
                          f"{'supports' if bf16 else 'has no'} bf16"}
    key = json.dumps([cpu, torch.get_num_threads(), torch.__version__, tokens, d_model, ffn])
    path = _cache_path()
    try:
        with open(path) as f:
            cached = json.load(f).get(key)
    except (OSError, ValueError):
        cached = None
    if cached:
        return {**cached, "reason": cached["reason"] + " (cached for this machine)"}
    fp32_s = time_matmul(torch.float32, tokens, d_model, 2 * ffn)
    bf16_s = time_matmul(torch.bfloat16, tokens, d_model, 2 * ffn)
    precision = decide(fp32_s, bf16_s)
    choice = {"precision": precision, "fp32_ms": round(fp32_s * 1e3, 4), "bf16_ms": round(bf16_s * 1e3, 4),
              "cpu": cpu,
              "reason": f"CPU matmul {tokens}x{d_model}x{2 * ffn}: bf16 {fp32_s / bf16_s:.2f}x fp32's speed "
                        f"(bf16-mixed needs >= {BF16_MARGIN}x); flags: {' '.join(cpu['flags']) or 'none'}"}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        table[key] = choice
        write_json_atomic(path, table)
    except OSError as e:  # a read-only cache: the choice still holds for this run
        log.warning("precision: could not cache the choice in %s: %s", path, e)
    return choice


def resolve(requested: str, accelerator: str, d_model: int, ffn: int, previous: str | None = None,
            rank: int = 0) -> dict:
    """The precision a run trains in, and why. `previous`: the precision its earlier attempt trained in
    (a resumed run keeps it); rank > 0: a DDP rank, which takes rank 0's choice."""
    if requested != AUTO:
        return {"precision": requested, "reason": "set in the config", "cpu": cpu_info()}
    if rank > 0 and os.environ.get(ENV):
        return {"precision": os.environ[ENV], "reason": "rank 0's choice", "cpu": cpu_info()}
    if previous and previous != AUTO:
        choice = {"precision": previous, "reason": "the precision this run started with (resumed)",
                  "cpu": cpu_info()}
    else:
        choice = choose(accelerator, d_model, ffn)
    os.environ[ENV] = choice["precision"]  # the DDP ranks this process launches take the same
    log.info("precision=auto -> %s: %s", choice["precision"], choice["reason"])
    return choice
