"""From a composed Hydra config to a finished run directory. `src/train.py` only calls `train(cfg)`.

Order matters: validate the whole config (no data, no model), then data -> model -> Trainer -> fit ->
final validation -> summary.json. A failure after validation still leaves a summary with status "failed".
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
import traceback

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from .analysis import routing_analysis, settling_step, write_analysis
from .callbacks import FaultCheckpoint
from .cpu import malloc_settings
from .data.corpus import expand_files
from .lit import LitLM
from .model.config import PRESETS, VARIANTS, ModelConfig
from .runs import SUMMARY, git_commit, package_versions, read_summary, write_json_atomic

log = logging.getLogger("remoe")


class ConfigError(ValueError):
    """A bad config value; the message starts with the offending key."""


def slug(overrides: str | None) -> str:
    """Folder name for a run from Hydra's override_dirname: readable, filesystem-safe, bounded."""
    s = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", overrides or "") or "default"
    if len(s) > 96:
        s = s[:80] + "-" + hashlib.sha1(s.encode()).hexdigest()[:10]
    return s


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("remoe_slug"):
        OmegaConf.register_new_resolver("remoe_slug", slug)


# Where each ModelConfig field is set in the Hydra config (for error messages).
_KEY_OF_FIELD = {"experts": "experts", "topk": "topk", "granularity": "granularity"}


def model_config(cfg: DictConfig, vocab_size: int = 50257) -> ModelConfig:
    """ModelConfig from size (preset + arch overrides), model variant and the top-level knobs."""
    if cfg.size.name not in PRESETS:
        raise ConfigError(f"size: unknown preset {cfg.size.name!r}; choose one of {sorted(PRESETS)}")
    if cfg.model.name not in VARIANTS:
        raise ConfigError(f"model: unknown model {cfg.model.name!r}; choose one of {sorted(VARIANTS)}")
    m = OmegaConf.to_container(cfg.model, resolve=True)
    m.pop("name")
    fields = {**PRESETS[cfg.size.name], **OmegaConf.to_container(cfg.size.arch, resolve=True), **m,
              "vocab_size": vocab_size}
    if VARIANTS[cfg.model.name] is not None:
        fields.update(experts=cfg.experts, topk=cfg.topk, granularity=cfg.granularity)
    if not cfg.get("load_balancing", True):  # the ablation: plain L1 (ReMoE), no aux loss (TopK)
        fields.update(regularizer="l1", aux_loss_coef=0.0)
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        field = str(e).split(":")[0].strip()
        key = _KEY_OF_FIELD.get(field, f"model.{field}" if field in m else f"size.arch.{field}")
        raise ConfigError(f"{key}: {str(e).split(':', 1)[-1].strip()}") from None


def world_size(cfg: DictConfig) -> int:
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if devices in ("auto", None) and cfg.trainer.get("accelerator") == "cpu":
        devices = 1
    if not isinstance(devices, int):
        n = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else None
        if n is None:
            raise ConfigError(f"trainer.devices: give a number of devices, not {devices!r}, "
                              "so the gradient accumulation can be derived from the global batch")
        devices = n
    if devices <= 0 or nodes <= 0:
        raise ConfigError("trainer.devices/trainer.num_nodes: must be positive")
    return devices * nodes


def batch_split(cfg: DictConfig) -> tuple[int, int]:
    """(micro-batch per device, accumulation steps) from the global batch and the device count.
    size.micro_batch_size is the most one device holds; fewer devices -> more accumulation."""
    gb, mb, ws = cfg.size.global_batch_size, cfg.size.micro_batch_size, world_size(cfg)
    if mb <= 0 or gb <= 0 or gb % ws != 0:
        raise ConfigError(f"size.global_batch_size: {gb} is not divisible by devices x nodes ({ws})")
    micro = min(mb, gb // ws)
    if (gb // ws) % micro != 0:
        raise ConfigError(f"size.global_batch_size: {gb} / (devices x nodes = {ws}) is not divisible by "
                          f"size.micro_batch_size ({mb})")
    return micro, gb // ws // micro


def validate(cfg: DictConfig) -> ModelConfig:
    """Every check that needs no data and no model. Raises ConfigError naming the key."""
    mcfg = model_config(cfg)
    for key in ("seed", "experts", "topk", "granularity"):
        if not isinstance(cfg.get(key), int):
            raise ConfigError(f"{key}: must be an int (got {cfg.get(key)!r})")
    if cfg.size.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"size.seq_len: {cfg.size.seq_len} exceeds the model context {mcfg.max_seq_len}")
    batch_split(cfg)
    if cfg.trainer.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps: must be > 0 (got {cfg.trainer.max_steps})")
    if cfg.data.source == "text_files":
        try:
            for path in expand_files(cfg.data.files):
                with open(path, "rb"):
                    pass
        except (OSError, TypeError) as e:
            raise ConfigError(f"data.files: {str(e).removeprefix('data.files: ')}") from None
    if cfg.data.source not in ("stdlib", "text_files", "hf"):
        raise ConfigError(f"data.source: unknown source {cfg.data.source!r}")
    if cfg.eval.suite != "none":
        from .eval.run import HubUnavailable, check_tasks

        try:
            check_tasks(cfg.eval.suite, cfg.eval.tasks)
        except HubUnavailable as e:
            raise ConfigError(f"eval: {e}") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return mcfg


def derive(cfg: DictConfig) -> None:
    """Fill the values that follow from others: micro-batch and accumulation from the global batch,
    validation interval in micro-batches."""
    micro, accumulate = batch_split(cfg)
    with open_dict(cfg):
        cfg.data.micro_batch_size = micro
        cfg.trainer.accumulate_grad_batches = accumulate
        cfg.trainer.val_check_interval = cfg.size.val_interval * accumulate


def needs_own_process(cfg: DictConfig) -> bool:
    """Multirun + multi-process DDP on this machine (PITFALLS.md #1): Lightning's ddp relaunches
    sys.argv (with -m) for the other ranks, so each would start the sweep again. Such a grid point runs
    as a plain single-run child process instead. Under SLURM the launcher creates the ranks."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return (multirun and world_size(cfg) > 1 and "SLURM_NTASKS" not in os.environ
            and str(cfg.trainer.strategy).startswith("ddp") and cfg.trainer.strategy != "ddp_spawn")


def run(cfg: DictConfig, run_dir: str) -> dict:
    """One grid point: in this process, or (multirun + DDP) in a child `train.py` with the same overrides.
    With skip_completed, a run directory that already holds a completed summary is not trained again."""
    done = read_summary(run_dir)
    if cfg.get("skip_completed") and done and done.get("status") == "completed":
        log.info("skip_completed: %s is already complete", run_dir)
        return done
    if not needs_own_process(cfg):
        return train(cfg, run_dir)
    import subprocess
    import sys

    from hydra.core.hydra_config import HydraConfig

    validate(cfg)
    overrides = list(HydraConfig.get().overrides.task)
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *overrides, f'hydra.run.dir="{run_dir}"']
    log.info("multirun + DDP: running this grid point as %s", " ".join(cmd))
    proc = subprocess.run(cmd)
    summary = read_summary(run_dir) or {}
    if proc.returncode != 0:
        raise RuntimeError(f"grid point {overrides} failed with exit code {proc.returncode}; see {run_dir}")
    return summary


def evaluate_run(cfg: DictConfig, lit: LitLM, dm, run_dir: str, summary: dict) -> dict:
    """lm-eval on the trained model, in this process; results stored in the run directory."""
    from .eval.adapter import RemoeLM
    from .eval.run import SUITES, evaluate, store
    from .eval.tasks import build_local_tasks

    e = cfg.eval
    include = None
    if e.suite == "local":
        include = build_local_tasks(dm.validation_texts(), os.path.join(dm.cache_dir, "eval"), n=e.n_docs)
    lm = RemoeLM(model=lit.model, tokenizer=dm.tokenizer, device=str(lit.device), batch_size=e.batch_size,
                 dtype=str(cfg.trainer.precision))
    tasks = list(e.tasks) if e.tasks else list(SUITES[e.suite])
    results = evaluate(lm, tasks, include_path=include, limit=e.limit,
                       bootstrap_iters=e.bootstrap_iters, seed=cfg.seed)
    return store(run_dir, results, e.suite, summary)


def check_checkpoint_matches(path: str, mcfg: ModelConfig) -> None:
    """Resuming (or evaluating) weights under a different model config is an error, not garbage numbers."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {}).get("model")
    if saved is None:
        raise ConfigError(f"resume: {path} holds no model config")
    diff = {k: (saved.get(k), v) for k, v in mcfg.to_dict().items() if saved.get(k) != v}
    if diff:
        raise ConfigError("resume: the checkpoint was trained with a different model config: " +
                          ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in sorted(diff.items())))


def _settling(lit: LitLM, mcfg: ModelConfig) -> int | None:
    """Global step from which ReMoE's sparsity stays within ±0.05 of target (of this process's steps)."""
    if mcfg.router != "relu":
        return None
    i = settling_step(lit.sparsity_history, mcfg.target_sparsity)
    return None if i is None else lit.history_start + i


def _tail_mean(xs: list[float], frac: float = 0.1, cap: int = 50) -> float | None:
    if not xs:
        return None
    n = max(1, min(cap, int(len(xs) * frac)))
    return sum(xs[-n:]) / n


def train(cfg: DictConfig, run_dir: str) -> dict:
    """Validate, train, validate, write summary.json; re-raises after recording a failure."""
    mcfg = validate(cfg)  # before anything is built
    derive(cfg)
    os.makedirs(run_dir, exist_ok=True)
    summary = {
        "status": "running", "name": cfg.name, "model": cfg.model.name, "size": cfg.size.name,
        "experts": cfg.experts if mcfg.is_moe else None, "topk": cfg.topk if mcfg.is_moe else None,
        "granularity": cfg.granularity if mcfg.is_moe else None, "seed": cfg.seed,
        "target_sparsity": mcfg.target_sparsity if mcfg.is_moe else None,
        "regularizer": mcfg.regularizer if mcfg.router == "relu" else None,
        "aux_loss_coef": mcfg.aux_loss_coef if mcfg.router == "topk" else None,
        "lambda0": mcfg.lambda0 if mcfg.router == "relu" else None,
        "alpha": mcfg.alpha if mcfg.router == "relu" else None,
        "ffn_mult": mcfg.ffn_mult,
        "downstream": None, "git_commit": git_commit(), "versions": package_versions(), "run_dir": run_dir,
        "malloc": malloc_settings(),
    }
    if rank_zero_only.rank == 0:
        with open(os.path.join(run_dir, "config_resolved.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    t0 = time.time()
    loggers = []
    try:
        L.seed_everything(cfg.seed, workers=True)
        dm = instantiate(cfg.data)
        dm.prepare_data()  # tokenizer + packed cache (file-locked: safe with several ranks)
        mcfg = model_config(cfg, vocab_size=dm.vocab_size)
        summary.update(total_params=mcfg.param_counts()["total"], active_params=mcfg.param_counts()["active"],
                       vocab_size=mcfg.padded_vocab_size, corpus=dm.corpus_fingerprint)
        lit = LitLM(model=mcfg.to_dict(), optim=OmegaConf.to_container(cfg.optim, resolve=True),
                    routing_log_interval=cfg.routing_log_interval)
        lit.tokenizer_json = dm.tokenizer.to_str()
        if rank_zero_only.rank == 0:
            dm.tokenizer.save(os.path.join(run_dir, "tokenizer.json"))
        loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        callbacks = [
            L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                                every_n_train_steps=cfg.size.ckpt_interval),
            FaultCheckpoint(ckpt_dir),
        ]
        if mcfg.is_moe:
            from .analysis import FlipProbe
            from .callbacks import RoutingStatsWriter

            callbacks.append(RoutingStatsWriter(os.path.join(run_dir, "routing.jsonl"), cfg.routing_log_interval))
            if cfg.analysis.flip_interval:
                callbacks.append(FlipProbe(os.path.join(run_dir, "flips.jsonl"), cfg.analysis.flip_interval))
        trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
        last = os.path.join(ckpt_dir, "last.ckpt")
        ckpt_path = last if cfg.resume and os.path.exists(last) else None
        if cfg.resume and ckpt_path is None:
            log.warning("resume=true but %s does not exist: starting from scratch", last)
        if ckpt_path:
            check_checkpoint_matches(ckpt_path, mcfg)
        t_fit = time.time()
        trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
        fit_s = time.time() - t_fit
        val = trainer.validate(lit, datamodule=dm, verbose=False)[0]
        tokens_per_step = cfg.size.global_batch_size * cfg.size.seq_len
        summary.update(
            status="completed", steps=trainer.global_step, train_tokens=trainer.global_step * tokens_per_step,
            val_loss=float(val["val/loss"]), val_ppl=math.exp(float(val["val/loss"])),
            sparsity=_tail_mean(lit.sparsity_history) if mcfg.router == "relu" else None,
            sparsity_final=lit.sparsity_history[-1] if lit.sparsity_history else None,
            **{"lambda": lit.controller.value if lit.controller else None},
            tokens_per_s=lit.train_tokens / lit.train_time if lit.train_time else None,
            fit_time_s=fit_s, resumed_from=ckpt_path, world_size=trainer.world_size, rank_states=lit.rank_states,
            settling_step=_settling(lit, mcfg),
        )
        if mcfg.is_moe and trainer.is_global_zero and cfg.analysis.batches:
            write_analysis(os.path.join(run_dir, "routing_analysis.json"),
                           routing_analysis(lit.model, dm.val_dataloader(), cfg.analysis.batches))
        if cfg.eval.suite != "none" and trainer.is_global_zero:
            write_json_atomic(os.path.join(run_dir, SUMMARY), summary)  # training is on disk before eval
            try:
                evaluate_run(cfg, lit, dm, run_dir, summary)
            except Exception as e:
                summary["downstream_error"] = f"{type(e).__name__}: {e}"
                raise
            for lg in loggers:
                lg.log_metrics({f"downstream/{t}/{m}": v for t, row in summary["downstream"].items()
                                for m, v in row.items() if v is not None}, step=trainer.global_step)
    except SIGTERMException:
        summary.update(status="preempted", error="SIGTERM/SIGUSR1: checkpointed to checkpoints/last.ckpt; "
                       "rerun with resume=true to continue")
        raise
    except BaseException as e:
        if summary["status"] != "completed":
            summary.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        summary["wall_time_s"] = time.time() - t0
        if rank_zero_only.rank == 0:
            write_json_atomic(os.path.join(run_dir, SUMMARY), summary)
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger":
                import wandb

                wandb.finish()  # the next multirun job must open a new run (PITFALLS.md #5)
    return summary
