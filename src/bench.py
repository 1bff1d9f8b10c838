"""Throughput benchmarks; ratios against baselines measured in the same process.

  python src/bench.py model --size tiny --precision bf16           # Table 7 layout: train/infer TFLOPS, MFU
  python src/bench.py layer --E 8 64 128 --G 1 8 --precision fp32 bf16   # MoE layer vs dense (vs Mixtral)
  python src/bench.py gpu                                          # the GPU suite, <= 8 min (remoe/bench/gpu.py)
  python src/bench.py step --config "size=small model=topk"        # step profile; Lightning vs a bare loop
"""

from remoe.cpu import malloc_settings, reexec_with_malloc_settings

reexec_with_malloc_settings()  # before torch loads: glibc reads these at start-up (remoe/cpu.py)

import argparse
import itertools
import sys

from remoe.bench.layer import bench_layer
from remoe.bench.model import bench_models, paper_table
from remoe.cli import ArgumentParser, UsageError, guard
from remoe.io import write_json_atomic
from remoe.train.precision import cpu_info
from remoe.train.record import git_commit, package_versions


def environment() -> dict:
    import torch

    return {"argv": sys.argv, "git_commit": git_commit(), "versions": package_versions(),
            "torch_threads": torch.get_num_threads(), "malloc": malloc_settings(),
            "grouped_mm": hasattr(torch, "_grouped_mm"), "cpu": cpu_info()}  # cpu: which bf16 machine


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {v})")
    return v


def check_args(a) -> None:
    """Every size a benchmark will build, checked before any compute (UsageError naming the flag)."""
    import torch

    from remoe.model import ModelConfig
    from remoe.model.config import ConfigFieldError
    from remoe.model.presets import preset_arch

    if str(getattr(a, "device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here (use --device cpu)")
    try:
        if a.cmd == "model":
            arch = preset_arch(a.size)
            for method in ("dense", "topk", "remoe"):
                cfg = ModelConfig(**{**arch, "routing": method, "experts": a.experts, "topk": a.topk,
                                     "granularity": a.granularity, "vocab_size": 4096})
            if a.seq is not None and a.seq > cfg.max_seq_len:
                raise UsageError(f"--seq: {a.seq} exceeds the {a.size} context of {cfg.max_seq_len}")
        elif a.cmd == "layer":
            for E in a.E:
                for k in a.k:
                    for G in a.G:
                        ModelConfig(n_layer=1, d_model=a.d, n_head=8, n_kv_head=8, ffn_hidden=a.ffn, vocab_size=8,
                                    routing="topk", experts=E, topk=k, granularity=G)
        elif a.cmd == "gpu":
            preset_arch(a.size)
    except ConfigFieldError as e:
        flag = {"experts": "--experts/--E", "topk": "--topk/--k", "granularity": "--granularity/--G",
                "n_head": "--d", "d_model": "--d"}.get(e.field, e.field)
        raise UsageError(f"{flag}: {e.msg}") from None
    except ValueError as e:  # an unknown --size preset
        raise UsageError(f"--size: {str(e).removeprefix('size: ')}") from None


def parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("--size", default="tiny")
    m.add_argument("--experts", type=positive, default=8)
    m.add_argument("--topk", type=positive, default=1)
    m.add_argument("--granularity", type=positive, default=1)
    m.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    m.add_argument("--device", default="cpu")
    m.add_argument("--batch", type=positive, default=8)
    m.add_argument("--seq", type=positive, default=None)
    m.add_argument("--reps", type=positive, default=5)
    m.add_argument("--out", default="bench_model.json")
    la = sub.add_parser("layer")
    la.add_argument("--E", type=positive, nargs="+", default=[8])
    la.add_argument("--k", type=positive, nargs="+", default=[1])
    la.add_argument("--G", type=positive, nargs="+", default=[1])
    la.add_argument("--d", type=positive, default=512)
    la.add_argument("--ffn", type=positive, default=1024)
    la.add_argument("--tokens", type=positive, default=4096)
    la.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    la.add_argument("--device", default="cpu")
    la.add_argument("--reps", type=positive, default=10)
    la.add_argument("--out", default="bench_layer.json")
    g = sub.add_parser("gpu", help="the GPU suite: checks, host syncs, 182m throughput at the paper's batch with "
                                    "HF peers and profiles, E=64, compiled (remoe/bench/gpu.py)")
    g.add_argument("--device", default="cuda")
    g.add_argument("--size", default="182m")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    g.add_argument("--batch", type=positive, default=4)
    g.add_argument("--seq", type=positive, default=None)
    g.add_argument("--reps", type=positive, default=3)
    g.add_argument("--configs", nargs="+", default=["8:1:1"], help="E:k:G to time in the base part")
    g.add_argument("--parts", nargs="+", choices=["checks", "syncs", "paper", "base", "e64", "compiled"],
                   default=["checks", "syncs", "paper", "base", "e64", "compiled"], help="parts to run, in order")
    g.add_argument("--paper-batch", type=positive, default=16, help="micro-batch of the paper parts")
    g.add_argument("--paper-vocab", type=positive, default=50257, help="vocabulary of the paper parts (GPT-2)")
    g.add_argument("--checks", nargs="+", default=["8:1:1", "8:2:1", "64:1:8"], help="E:k:G to check")
    g.add_argument("--out", default=None, help="default: reports/bench/gpu_<device name>.json")
    st = sub.add_parser("step", help="where a training step's time goes; Lightning vs a bare loop (same process)")
    st.add_argument("--config", action="append", default=None,
                    help='train.py overrides of one config, quoted (repeatable); default: size=small, '
                         'model=dense, topk, remoe')
    st.add_argument("--steps", type=positive, default=20)
    st.add_argument("--warmup", type=int, default=5)
    st.add_argument("--out", default="bench_step.json")
    return p


def main() -> None:
    a = parser().parse_args()
    check_args(a)
    env = environment()
    {"step": bench_steps, "gpu": gpu_suite, "model": bench_model, "layer": bench_layers}[a.cmd](a, env)


def bench_steps(a, env: dict) -> None:
    """bench.py step: where a training step's time goes (remoe/bench/step.py)."""
    from remoe.bench.step import bench_step, compose_config, profile_table
    from remoe.train.spec import validate

    configs = [c.split() for c in (a.config or [f"size=small model={m}" for m in ("dense", "topk", "remoe")])]
    if a.warmup < 0:
        raise UsageError(f"--warmup: must be >= 0 (got {a.warmup})")
    for c in configs:  # every config checked before any compute (one line, exit 2: remoe.cli)
        validate(compose_config(c))
    rows = []
    for c in configs:
        rows.append(bench_step(c, a.steps, a.warmup))
        write_json_atomic(a.out, {"rows": rows, "environment": env})  # keep finished rows
    print(profile_table(rows))
    print(f"-> {a.out}")


def gpu_suite(a, env: dict) -> None:
    """bench.py gpu: the GPU suite (remoe/bench/gpu.py); exit 1 if a check failed."""
    from remoe.bench.gpu import parse_config, run_suite, table

    def out_path(res: dict) -> str:
        return a.out or f"reports/bench/gpu_{res['device_name'].replace(' ', '_')}.json"

    try:
        configs, checks = [parse_config(c) for c in a.configs], [parse_config(c) for c in a.checks]
    except ValueError as e:
        raise UsageError(str(e)) from None
    res = run_suite(a.device, a.size, a.precision, a.batch, a.seq, a.reps, configs, checks,
                    on_part=lambda r: write_json_atomic(out_path(r), {**r, "environment": env}),
                    parts=a.parts, paper_batch=a.paper_batch, paper_vocab=a.paper_vocab)
    print(table(res))
    print(f"-> {out_path(res)}")
    sys.exit(0 if all(c["ok"] for c in res["checks"]) else 1)


def bench_model(a, env: dict) -> None:
    """bench.py model: whole models, Table-7 style."""
    res = bench_models(a.size, a.experts, a.topk, a.granularity, a.precision, a.device, a.batch, a.seq, a.reps)
    print(paper_table(res))
    write_json_atomic(a.out, {**res, "environment": env})
    print(f"-> {a.out}")


def bench_layers(a, env: dict) -> None:
    """bench.py layer: one MoE layer against dense and Mixtral's, each finished row kept."""
    rows = []
    print("| E | k | G | precision | topk/dense | remoe/dense | speed-up vs Mixtral (eager) | "
          "vs Mixtral (grouped_mm) | remoe sparsity |")
    print("|---|---|---|---|---|---|---|---|---|")
    for prec, E, k, G in itertools.product(a.precision, a.E, a.k, a.G):
        r = bench_layer(a.d, a.ffn, E, k, G, a.tokens, prec, a.device, a.reps)
        rows.append(r)
        write_json_atomic(a.out, {"rows": rows, "environment": env})  # keep finished rows
        mx, mg = (f"{r[c]:.2f}x" if r[c] else "n/a" for c in ("speedup_vs_mixtral", "speedup_vs_mixtral_gmm"))
        print(f"| {E} | {k} | {G} | {prec} | {r['ratio_topk_vs_dense']:.2f} | "
              f"{r['ratio_remoe_vs_dense']:.2f} | {mx} | {mg} | {r['remoe_sparsity']:.3f} |", flush=True)
    write_json_atomic(a.out, {"rows": rows, "environment": env})
    print(f"-> {a.out}")


if __name__ == "__main__":
    guard(main, "bench")
