"""FLOPs as PyTorch counts them (FlopCounterMode), with the formulas torch 2.13 lacks for what this model
runs: torch._grouped_mm (the MoE expert GEMMs) and the CPU flash-attention kernel; GQA shapes on older torch.
The plan (activation and FLOP estimates) and the benches (MFU) count with these."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of torch._grouped_mm, which PyTorch's FlopCounterMode does not count (torch 2.13): each
    row / contraction slice meets exactly one group's matrix."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # (N, K) x (E, K, M): rows grouped
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # (K, N) x (N, M) -> (E, K, M): contraction grouped
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 3:  # batched
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]  # (E, N, K) x (K, M): columns grouped


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _broadcast_kv_heads(count):
    """An SDPA FLOP formula of a torch that asserts equal head counts (before 2.13), given GQA shapes: a
    grouped K/V head serves each of its query heads, so the FLOPs are those of K/V repeated to the
    query's heads (what torch 2.13's own formula computes)."""
    def counted(*shapes):
        *lead, q, k, v = shapes
        h = q[1]
        return count(*lead, q, (k[0], h, *k[2:]), (v[0], h, *v[2:]))
    return counted


def _count_gqa_attention() -> None:
    try:
        flop_counter.sdpa_flop_count((1, 2, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1))
    except AssertionError:  # torch < 2.13: the registered SDPA formulas look these names up when called
        flop_counter.sdpa_flop_count = _broadcast_kv_heads(flop_counter.sdpa_flop_count)
        flop_counter.sdpa_backward_flop_count = _broadcast_kv_heads(flop_counter.sdpa_backward_flop_count)


def register_flop_formulas() -> None:
    """Teach FlopCounterMode what it does not count (torch 2.13): torch._grouped_mm (the MoE expert GEMMs;
    without it MoE FLOPs are undercounted ~3x) and the CPU flash-attention kernel SDPA runs on CPU
    (without it attention counts 0 on CPU), with torch's own SDPA formulas (full S^2: the causal half is
    not discounted, as Megatron's and the paper's FLOP counts); on torch < 2.13, attention with grouped
    K/V heads (GQA), which its SDPA formulas refuse. Registered when counting, not at import."""
    _count_gqa_attention()
    extra = [(getattr(torch.ops.aten, "_grouped_mm", None), _grouped_mm_flops),
             (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None), _cpu_flash_flops),
             (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None),
              _cpu_flash_backward_flops)]
    for op, formula in extra:
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs PyTorch counts for one call (matmuls and attention), as actually executed."""
    register_flop_formulas()
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())
