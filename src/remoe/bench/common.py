"""Timing and FLOP counting shared by the benchmarks. Ratios, not absolute times, are what to compare:
every benchmark runs its baseline in the same process, interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fns(fns: dict[str, Callable[[], None]], device: torch.device, reps: int = 10,
             warmup: int = 2) -> dict:
    """Median seconds per call of each fn, the fns interleaved round by round (drift hits all alike)."""
    return {k: statistics.median(v) for k, v in time_samples(fns, device, reps, warmup).items()}


def spread(samples: list[float]) -> float:
    """(max - min) / median of repeated timings: what a bench row's number is good to."""
    return (max(samples) - min(samples)) / statistics.median(samples)


def time_samples(fns: dict[str, Callable[[], None]], device: torch.device, reps: int = 10,
                 warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call of each fn, `reps` rounds, the fns interleaved round by round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """Measured dense matmul rate (FLOP/s) on this device in this dtype: the MFU denominator (n=8192 on a
    GPU, where 2048 is too small to reach the peak; 2048 on CPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fns({"mm": lambda: a @ b}, device, reps=reps, warmup=2)["mm"]
    return 2 * n**3 / t
