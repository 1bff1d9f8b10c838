"""Where a training step's device time goes: `profile_train` runs a few steps under torch.profiler.

On a GPU: wall time per step, GPU busy time (the union of kernel intervals: overlapping streams count
once) and idle time (wall - busy: the GPU waiting for the host to queue work, host syncs being the usual
cause), host syncs per step (bench.model.count_syncs) and the top kernels by device time. On a CPU the
same rows come from op self times (busy = idle = None): the tests run it that way.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .common import sync


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def profile_train(step, dev: torch.device, steps: int = 3, top: int = 8) -> dict:
    """Profile `steps` calls of `step` (already warmed up)."""
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(dev)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(dev)
        wall = (time.perf_counter() - t) / steps
    per: dict[str, float] = defaultdict(float)
    kernels = []
    for ev in prof.events():
        on_device = ev.device_type == DeviceType.CUDA
        if cuda and on_device:
            kernels.append((ev.time_range.start, ev.time_range.end))
            per[ev.name] += (ev.time_range.end - ev.time_range.start) / steps
        elif not cuda and ev.self_cpu_time_total > 0:
            per[ev.name] += ev.self_cpu_time_total / steps
    busy = busy_us(kernels) / steps / 1e6 if cuda else None
    total = sum(per.values()) or 1.0
    ranked = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms": 1e3 * wall, "busy_ms": None if busy is None else 1e3 * busy,
            "idle_fraction": None if busy is None else max(0.0, 1 - busy / wall),
            "top": [{"name": n[:120], "ms": us / 1e3, "share": us / total} for n, us in ranked],
            "measured_as": "kernel time" if cuda else "op self CPU time"}
