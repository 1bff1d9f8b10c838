"""Where a training step's time goes, and what Lightning costs on top of a bare PyTorch loop.

For one composed config (`size=small model=topk ...`), in one process:
  lightning: the real pipeline (remoe.train.run.train: its callbacks, CSV logger, routing logs, flip probes),
             per-step seconds from its own train/tokens_per_s (TrainThroughput: successive step ends, so data
             loading and every hook count);
  bare:      the same model, routing method, data loader, AdamW + schedule, autocast and gradient clipping
             in a plain loop: the floor Lightning is measured against, timed the same way;
  profile:   torch.profiler over a few bare steps, self time by phase (forward, backward, optimizer, between)
             and by kind of op (dense GEMMs, expert stage, attention kernel, routing/dispatch, casts, ...).
The bare loop runs before and after the pipeline and its two medians are averaged (drift hits both alike).
"""

from __future__ import annotations

import csv
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.profiler import ProfilerActivity, profile, record_function

from ..model import RoutingStats
from ..model.presets import CONF_DIR
from ..resolvers import register_resolvers
from ..train.module import LitLM, compile_blocks
from ..train.optim import build_optimizer
from ..train.run import build_data, resolve_precision, train
from ..train.spec import derive, routing_knobs, validate

PHASES = ("forward", "backward", "optimizer", "between")  # "between": data loading, routing update, logging
KINDS = {  # first match wins; an op inside the expert stage is "expert stage" whatever it is
    "attention kernel": ("scaled_dot_product",),
    "GEMM (dense layers)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::linear"),
    "loss (log-softmax, NLL)": ("log_softmax", "nll_loss"),
    "routing + dispatch": ("nonzero", "bincount", "topk", "aten::relu", "threshold_backward", "index_select",
                           "index_add", "scatter", "gather", "cumsum", "repeat_interleave", "aten::sort"),
    "casts + copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat"),
    "fills": ("aten::fill_", "aten::zero_", "aten::zeros", "aten::empty"),
    "optimizer kernel": ("adamw", "_foreach", "aten::lerp", "addcdiv", "addcmul"),
}


def compose_config(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def kind_of(name: str, in_experts: bool) -> str:
    if in_experts:
        return "expert stage (grouped GEMMs, SwiGLU)"
    low = name.lower()
    for kind, keys in KINDS.items():
        if any(k.lower() in low for k in keys):
            return kind
    return "elementwise + norms + other"


def breakdown(prof, steps: int) -> dict:
    """Self CPU ms per step by phase x kind, from the profiler's event tree."""
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ev in prof.events():
        if ev.self_cpu_time_total <= 0 or ev.name in PHASES:
            continue
        phase, in_experts, p = "between", False, ev
        while p is not None:
            if p.name in PHASES:
                phase = p.name
                break
            in_experts |= "_ExpertsFn" in p.name
            p = p.cpu_parent
        table[phase][kind_of(ev.name, in_experts)] += ev.self_cpu_time_total / 1e3 / steps
    return {ph: dict(sorted(kinds.items(), key=lambda kv: -kv[1])) for ph, kinds in table.items()}


class BareLoop:
    """The training step of remoe.train.module.LitLM without Lightning: same model, routing method, optimizer and
    schedule (LitLM.configure_optimizers' pieces), autocast, clipping; the routing update after each step."""

    def __init__(self, cfg: DictConfig, mcfg, knobs: dict, loader, accumulate: int):
        self.lit = LitLM(model=mcfg, routing=knobs, optim=OmegaConf.to_container(cfg.optim, resolve=True))
        if cfg.get("compile"):
            compile_blocks(self.lit.model)
        self.loader, self.accumulate = loader, accumulate
        self.clip = cfg.trainer.gradient_clip_val
        self.autocast = str(cfg.trainer.precision).startswith("bf16")
        self.opt, self.sched = build_optimizer(self.lit, self.lit.optim, cfg.trainer.max_steps)
        self.step_i = 0

    def run(self, steps: int, prof=None) -> list[float]:
        """Seconds per optimizer step (successive step ends, as TrainThroughput measures Lightning's)."""
        lit, times, it = self.lit, [], iter(self.loader)
        lit.train()
        t_prev = time.perf_counter()
        for _ in range(steps):
            for _ in range(self.accumulate):
                batch = next(it)
                lit.routing.on_train_step_start(self.step_i, lit.model)
                with record_function("forward"), torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
                    lm, _, weighted = lit._losses(batch)
                    loss = (lm + weighted) / self.accumulate
                with record_function("backward"):
                    loss.backward()
            with record_function("optimizer"):
                torch.nn.utils.clip_grad_norm_(lit.parameters(), self.clip)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
            if lit.routing.moe:
                counts, tokens = lit.model.routing_counts()
                lit.model.reset_routing_counts()
                stats = RoutingStats(self.step_i, counts.cpu().numpy(), tokens.cpu().numpy())
                lit.routing.on_optimizer_step(stats, lit.model)
            self.step_i += 1
            now = time.perf_counter()
            times.append(now - t_prev)
            t_prev = now
            if prof is not None:
                prof.step()
        return times


def lightning_step_seconds(run_dir: str, tokens_per_step: int) -> list[float]:
    with open(Path(run_dir) / "metrics.csv") as f:
        return [tokens_per_step / float(r["train/tokens_per_s"]) for r in csv.DictReader(f)
                if r.get("train/tokens_per_s")]


def bench_step(overrides: list[str], steps: int = 20, warmup: int = 5, profile_steps: int = 3) -> dict:
    """One config: Lightning vs bare per-step seconds (medians after `warmup` steps) and the profile."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cfg = compose_config([*overrides, "logger=csv", "eval=none", f"size.max_steps={warmup + steps}",
                              "size.val_interval=100000", "size.val_batches=1", "trainer.enable_progress_bar=false",
                              f"paths.root={tmp}", f"trainer.default_root_dir={run_dir}",
                              f"logger.csv.save_dir={run_dir}", "report_on_multirun_end=false"])
        light_cfg = cfg.copy()  # the pipeline resolves its own precision and derives its own batch split
        mcfg = validate(cfg).model
        derive(cfg)
        resolve_precision(cfg, mcfg)  # as the pipeline does, so both loops train at the same precision
        dm, mcfg = build_data(cfg, mcfg)
        dm.setup("fit")
        accumulate = cfg.trainer.accumulate_grad_batches
        tokens_per_step = cfg.size.global_batch_size * cfg.size.seq_len

        def bare() -> tuple[BareLoop, list[float]]:
            torch.manual_seed(cfg.seed)
            loop = BareLoop(cfg, mcfg, routing_knobs(cfg), dm.train_dataloader(), accumulate)
            return loop, loop.run(warmup + steps)[warmup:]

        _, bare1 = bare()
        summary = train(light_cfg, run_dir)
        light = lightning_step_seconds(run_dir, tokens_per_step)[warmup:]
        loop, bare2 = bare()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loop.run(profile_steps, prof)
    bare_s = (statistics.median(bare1) + statistics.median(bare2)) / 2
    light_s = statistics.median(light)
    table = breakdown(prof, profile_steps)
    return {"overrides": overrides, "precision": str(cfg.trainer.precision), "tokens_per_step": tokens_per_step,
            "micro_batch": cfg.data.micro_batch_size, "accumulate": accumulate, "steps_timed": steps,
            "bare_step_s": bare_s, "lightning_step_s": light_s, "lightning_overhead": light_s / bare_s - 1,
            "bare_tokens_per_s": tokens_per_step / bare_s, "lightning_tokens_per_s": tokens_per_step / light_s,
            "bare_medians_s": [statistics.median(bare1), statistics.median(bare2)],
            "lightning_status": summary.get("status"), "profile_ms_per_step": table,
            "profile_total_ms": sum(sum(k.values()) for k in table.values())}


def profile_table(results: list[dict]) -> str:
    """Markdown: Lightning vs bare per config, then each config's time by phase and kind (ms per step)."""
    lines = ["| config | precision | bare tokens/s | Lightning tokens/s | Lightning overhead |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {' '.join(r['overrides'])} | {r['precision']} | {r['bare_tokens_per_s']:.0f} | "
                     f"{r['lightning_tokens_per_s']:.0f} | {100 * r['lightning_overhead']:+.1f}% |")
    for r in results:
        wall = 1e3 * r["bare_step_s"]
        lines += ["", (f"**{' '.join(r['overrides'])}** — bare step {wall:.0f} ms (profiled self time "
                       f"{r['profile_total_ms']:.0f} ms of op self time under the profiler, which adds its own)"),
                  "| phase | kind | ms/step | share of step |", "|---|---|---|---|"]
        for phase in PHASES:
            for kind, ms in r["profile_ms_per_step"].get(phase, {}).items():
                if ms >= 0.005 * wall:
                    lines.append(f"| {phase} | {kind} | {ms:.1f} | {100 * ms / wall:.1f}% |")
    return "\n".join(lines)

