"""From a composed Hydra config to a finished run directory. `src/train.py` only calls `run(cfg, dir)`.

One training attempt, in order: validate the whole config into a RunSpec (spec.py: no data, no model; the
routing method object is built here, once) -> check the checkpoint to resume from (resume.py) -> take the
folder (io.RunLock) -> begin (precision, plan.json, the summary of the setting, config_resolved.yaml) ->
prepare (data, LightningModule, loggers, callbacks, Trainer) -> fit (+ final validation) -> finish (routing
analysis, downstream evaluation). A failure after validation still leaves a summary with status "failed";
the training record is on disk before evaluation starts.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import plan
from ..analysis import FlipProbe, routing_analysis, write_analysis
from ..checkpoint import checkpoint_io, read_meta, remove_stale_partials
from ..console import closing_line
from ..cpu import malloc_settings
from ..eval.run import evaluate_checkpoint, evaluate_model
from ..io import RunFolderBusy, RunLock, write_json_atomic, write_text_atomic
from ..model import ModelConfig, param_counts
from . import precision
from .callbacks import FaultCheckpoint, RoutingStatsWriter, TrainThroughput, progress_bar
from .loggers import CSVLogger
from .module import LitLM, compile_blocks
from .optim import RECIPE
from .record import SUMMARY, RunSummary, git_commit, package_versions, read_config, read_summary, training_changes
from .resume import RESUME_CHANGES, Resume, check_same_arch, read_resume_changes, resume_checkpoint
from .spec import ConfigError, RunSpec, derive, validate, world_size

log = logging.getLogger("remoe")


def needs_own_process(cfg: DictConfig) -> bool:
    """Multirun + multi-process DDP on this machine: Lightning's ddp relaunches
    sys.argv (with -m) for the other ranks, so each would start the sweep again. Such a grid point runs
    as a plain single-run child process instead. Under SLURM the launcher creates the ranks."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return (multirun and world_size(cfg) > 1 and "SLURM_NTASKS" not in os.environ
            and str(cfg.trainer.strategy).startswith("ddp") and cfg.trainer.strategy != "ddp_spawn")


def run(cfg: DictConfig, run_dir: str) -> dict:
    """One grid point: in this process, or (multirun + DDP) in a child `train.py` with the same overrides.
    With skip_completed, a run directory that already holds a completed summary is not trained again; one
    whose completed run trained another setting is refused (ConfigError), never reported as this one."""
    done = read_summary(run_dir)
    if cfg.get("skip_completed") and done and done.get("status") == "completed":
        if changes := _changes_since(cfg, run_dir):  # e.g. a sweep file's scale changed, same folder names
            raise ConfigError(f"skip_completed: {run_dir} holds a completed run of another setting "
                              f"({'; '.join(changes)}); train it in another folder (REMOE_OUTPUT or hydra.run.dir)")
        if cfg.eval.suite != "none" and done.get("downstream") is None and rank_zero_only.rank == 0:
            return evaluate_final_checkpoint(cfg, run_dir, done)
        log.info("skip_completed: %s is already complete", run_dir)
        return done
    if not needs_own_process(cfg):
        return train(cfg, run_dir)

    validate(cfg)
    overrides = [o for o in HydraConfig.get().overrides.task  # the grid's resume rule travels to the child
                 if o.lstrip("+~").split("=")[0] not in ("resume", "skip_completed")]
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *overrides, f'hydra.run.dir="{run_dir}"',
           f"resume={str(bool(cfg.get('resume'))).lower()}"]
    log.info("multirun + DDP: running this grid point as %s", " ".join(cmd))
    proc = subprocess.run(cmd)
    summary = read_summary(run_dir) or {}
    if proc.returncode != 0:
        raise RuntimeError(f"grid point {overrides} failed with exit code {proc.returncode}; see {run_dir}")
    return summary


def _changes_since(cfg: DictConfig, run_dir: str) -> list[str]:
    """How this config trains differently from the run folder's completed run (record.training_changes)."""
    try:
        saved = read_config(run_dir)
    except ValueError as e:
        raise ConfigError(f"skip_completed: {e}") from None
    if saved is None:
        return []  # a record without its config: nothing to compare
    here = copy.deepcopy(cfg)
    derive(here)  # as the saved config was written (the derived micro-batch)
    return training_changes(saved, OmegaConf.to_container(here, resolve=True))


def evaluate_final_checkpoint(cfg: DictConfig, run_dir: str, done: dict) -> dict:
    """Finish a completed run whose configured evaluation is missing (the process was stopped during it:
    summary.json is written before evaluation starts) from its final checkpoint, never by training again.
    Without a checkpoint of the final step the record is kept as it is, and a warning says so."""
    validate(cfg)  # e.g. eval=paper offline: one line, exit 2, before a checkpoint is loaded
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    try:
        step, why = int(read_meta(last)["global_step"]), None
    except FileNotFoundError:
        step, why = None, "none"
    except Exception as e:
        step, why = None, f"last.ckpt cannot be read: {type(e).__name__}"
    if step != done.get("steps"):
        log.warning("skip_completed: %s is complete but has no evaluation, and no checkpoint of its final step "
                    "%s to evaluate (%s); kept as it is", run_dir, done.get("steps"),
                    why or f"last.ckpt is at step {step}")
        return done
    log.warning("skip_completed: %s is complete but its evaluation is missing (stopped during it?): "
                "evaluating its final checkpoint (step %d)", run_dir, step)
    evaluate_checkpoint(OmegaConf.create({  # as src/evaluate.py does it; the data config is the run's own
        "checkpoint": last, "out": run_dir, "eval": cfg.eval, "seed": cfg.seed,
        "device": "cuda" if plan.on_gpus(cfg.trainer) else "cpu",
        "dtype": str(done.get("precision") or "32-true")}))
    after = read_summary(run_dir)
    _log_late_evaluation(cfg, after, done["steps"])
    return after


def _log_late_evaluation(cfg: DictConfig, summary: dict, step: int) -> None:
    """The run's configured loggers get the late evaluation as training's own would have logged it:
    metrics.csv gains the downstream row at the final step; W&B gets a new run of the same group and name
    (as a resumed training attempt does), with the config, holding the downstream numbers."""
    loggers = _loggers(cfg)
    try:
        for lg in loggers:  # metrics.csv's training has its hparams.yaml already
            if isinstance(lg, L.pytorch.loggers.WandbLogger):
                lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        log_downstream(loggers, summary.get("downstream") or {}, step)
        for lg in loggers:
            lg.finalize("success")
    finally:
        _finish(loggers)


def _loggers(cfg: DictConfig) -> list:
    """The loggers `cfg.logger` names (a group of optional entries; null ones are off)."""
    return [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]


def _finish(loggers: list) -> None:
    """Close W&B's run: else the next multirun job's (or the next call's) WandbLogger reuses it still open."""
    if any(isinstance(lg, L.pytorch.loggers.WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def _callbacks(cfg: DictConfig, run_dir: str, lit: LitLM) -> list[L.Callback]:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if rank_zero_only.rank == 0 and os.path.isdir(ckpt_dir):
        remove_stale_partials(ckpt_dir)  # a save cut short by a kill (checkpoint.save_atomic)
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                            every_n_train_steps=cfg.size.ckpt_interval),
        FaultCheckpoint(ckpt_dir), TrainThroughput(),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(progress_bar())
    if lit.routing.moe:
        callbacks.append(RoutingStatsWriter(os.path.join(run_dir, "routing.jsonl"), cfg.routing_log_interval))
        if cfg.analysis.flip_interval:
            callbacks.append(FlipProbe(os.path.join(run_dir, "flips.jsonl"), cfg.analysis.flip_interval))
    return callbacks


def _evaluate(cfg: DictConfig, trainer, lit: LitLM, model, dm, run_dir: str, summary: RunSummary,
              loggers) -> None:
    """Routing analysis and downstream evaluation of the final model (rank zero; `model`: lit.whole_model())."""
    if lit.routing.moe and cfg.analysis.batches:
        write_analysis(os.path.join(run_dir, "routing_analysis.json"),
                       routing_analysis(model, dm.val_dataloader(), cfg.analysis.batches))
    if cfg.eval.suite == "none":
        return
    summary.write(run_dir)  # the training record is on disk before evaluation starts
    try:
        _, fields = evaluate_model(model, dm.tokenizer, cfg.eval, run_dir, datamodule=dm, seed=cfg.seed,
                                   device=str(next(model.parameters()).device), dtype=str(cfg.trainer.precision))
    except Exception as e:
        summary.downstream_error = f"{type(e).__name__}: {e}"
        raise
    summary.update(**fields)
    log_downstream(loggers, summary.downstream, trainer.global_step)


def log_downstream(loggers, downstream: dict, step: int) -> None:
    """The evaluation's numbers as `downstream/<task>/<metric>` at the final step, on every logger."""
    for lg in loggers:
        lg.log_metrics({f"downstream/{t}/{m}": v for t, row in downstream.items()
                        for m, v in row.items() if v is not None}, step=step)


def resume_command() -> str:
    """The command that continues this run: the same overrides plus resume=true."""

    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    args = [o for o in task if not o.startswith("resume=")] + ["resume=true"]
    return " ".join(["python", shlex.quote(sys.argv[0]), *map(shlex.quote, args)])


def _record(summary: RunSummary, run_dir: str, completed_before: bool) -> None:
    """Write the run's record. A completed record is never replaced by a failed or stopped attempt (e.g.
    a crashed extension of a finished run): that attempt's record goes to attempts/ beside it."""
    if completed_before and summary.status != "completed":
        path = os.path.join(run_dir, "attempts", f"{time.strftime('%Y%m%d-%H%M%S')}-{summary.status}.json")
        write_json_atomic(path, summary.to_json())
        log.warning("kept the completed summary.json; this %s attempt is recorded in %s", summary.status,
                    path)
    else:
        summary.write(run_dir)


def train(cfg: DictConfig, run_dir: str) -> dict:
    """Validate, train, validate, write summary.json; re-raises after recording a failure."""
    spec = validate(cfg)  # before anything is built
    derive(cfg)
    resume = resume_checkpoint(cfg, run_dir, spec.model)  # before the run folder is touched
    lock = RunLock(run_dir)
    if rank_zero_only.rank == 0:
        try:
            if stale := lock.acquire():
                log.warning("%s", stale)
        except RunFolderBusy as e:
            raise ConfigError(f"run folder: {e}") from None
    try:
        return _attempt(cfg, run_dir, spec, resume)
    finally:
        lock.release()


def resolve_precision(cfg: DictConfig, mcfg: ModelConfig, previous: str | None = None) -> dict:
    """trainer.precision as this run trains it ("auto" decided here, remoe.train.precision), written into cfg;
    returns how it was chosen. previous: the precision a resumed run trained at (kept)."""
    choice = precision.resolve(str(cfg.trainer.precision), str(cfg.trainer.accelerator), mcfg.d_model,
                               mcfg.ffn * mcfg.ffn_mult, previous=previous, rank=rank_zero_only.rank)
    with open_dict(cfg):
        cfg.trainer.precision = choice["precision"]
    return choice


def build_data(cfg: DictConfig, mcfg: ModelConfig):
    """(data module, tokenizer and packed cache prepared; mcfg with the tokenizer's vocabulary)."""
    dm = instantiate(cfg.data)
    try:
        dm.prepare_data()  # tokenizer + packed cache (file-locked: safe with several ranks)
    except ValueError as e:  # e.g. a corpus too small for a validation split
        raise ConfigError(str(e) if str(e).startswith("data") else f"data: {e}") from None
    return dm, replace(mcfg, vocab_size=dm.vocab_size)


def bounded_dispatch(cfg: DictConfig) -> bool:
    """moe_dispatch: bounded, exact, or auto = bounded where the run trains on CUDA (model.moe.PairCapacity)."""
    mode = cfg.get("moe_dispatch", "auto")
    accelerator = str(cfg.trainer.accelerator)
    return mode == "bounded" or (mode == "auto" and torch.cuda.is_available()
                                 and accelerator in ("gpu", "cuda", "auto"))


@dataclass
class Attempt:
    """One training attempt in a run folder: what it started from, and what prepare() built for it."""

    run_dir: str
    spec: RunSpec
    resume: Resume
    summary: RunSummary
    completed_before: bool  # the folder held a completed run (this attempt extends it)
    resolved: str  # this attempt's config_resolved.yaml
    dm: Any = None
    lit: LitLM | None = None
    loggers: list = field(default_factory=list)
    callbacks: list = field(default_factory=list)
    trainer: Any = None


def _attempt(cfg: DictConfig, run_dir: str, spec: RunSpec, resume: Resume) -> dict:
    """begin (the record of the setting) -> prepare (data, model, Trainer) -> fit -> finish (validation, record,
    evaluation). However it ends, summary.json says how (_record)."""
    a = begin(cfg, run_dir, spec, resume)
    t0 = time.time()
    try:
        L.seed_everything(cfg.seed, workers=True)
        prepare(cfg, a)
        fit(cfg, a)
        finish(cfg, a)
    except SIGTERMException:
        fault = next((c for c in a.callbacks if isinstance(c, FaultCheckpoint)), None)
        stopped_by = (fault and fault.stopped_by) or "SIGTERM"
        status = "interrupted" if stopped_by == "SIGINT" else "preempted"
        a.summary.update(status=status, error=f"{stopped_by}: checkpointed to checkpoints/last.ckpt; continue "
                         f"with: {resume_command()}")
        if status == "interrupted":
            raise SystemExit(130) from None  # the shell's code for Ctrl-C
        raise
    except BaseException as e:
        if a.summary.status != "completed":
            a.summary.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        a.summary.wall_time_s = time.time() - t0
        if rank_zero_only.rank == 0:
            _record(a.summary, run_dir, a.completed_before)
        _finish(a.loggers)
        if rank_zero_only.rank == 0:
            print(closing_line(a.summary.to_json(), os.path.join(run_dir, SUMMARY)), flush=True)
    return a.summary.to_json()


def begin(cfg: DictConfig, run_dir: str, spec: RunSpec, resume: Resume) -> Attempt:
    """Before any data or model: the precision, the plan (rank 0 refuses a strategy that does not fit before other
    ranks are launched), the summary of the setting (on a run that fails too), resume changes, config_resolved.yaml."""
    before = read_summary(run_dir) or {}
    completed_before = before.get("status") == "completed"
    requested = str(cfg.trainer.precision)
    choice = resolve_precision(cfg, spec.model, previous=before.get("precision") if resume.path else None)
    # the intra-op threads too: a CPU run's numbers at a seed depend on them (reductions split another way)
    cpu = {**choice.pop("cpu"), "threads": torch.get_num_threads()}
    if rank_zero_only.rank == 0:  # what this run needs per GPU
        the_plan = plan.plan_for(cfg, spec.model)
        write_json_atomic(os.path.join(run_dir, "plan.json"), the_plan)
        if plan.on_gpus(cfg.trainer) and (why := plan.check_fits(the_plan, plan.strategy_of(cfg.trainer))):
            raise ConfigError(f"trainer.strategy: {why} (plan.json in the run folder)")
    summary = RunSummary(name=cfg.name, model=cfg.model.name, size=cfg.size.name, seed=cfg.seed,
                         ffn_mult=spec.model.ffn_mult,
                         **{k: type(v)(cfg.optim.get(k, v)) for k, v in RECIPE.items()},
                         precision=str(cfg.trainer.precision),
                         precision_choice={"requested": requested, **choice}, cpu=cpu,
                         git_commit=git_commit(), versions=package_versions(), run_dir=run_dir,
                         malloc=malloc_settings())
    summary.update(**spec.method.record())  # the setting, also on a run that fails
    _keep_resume_changes(run_dir, resume, summary)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    if rank_zero_only.rank == 0 and not completed_before:  # a completed run's config stays until replaced
        write_text_atomic(os.path.join(run_dir, "config_resolved.yaml"), resolved)
    return Attempt(run_dir, spec, resume, summary, completed_before, resolved)


def _keep_resume_changes(run_dir: str, resume: Resume, summary: RunSummary) -> None:
    """Every resume's changes so far, in summary.json and resume_changes.json (config_resolved.yaml holds this
    attempt's values); a fresh start sets an earlier run's file aside."""
    changes = (read_resume_changes(run_dir) if resume.path else []) + list(resume.changes)
    summary.update(resume_changes=changes or None)
    path = os.path.join(run_dir, RESUME_CHANGES)
    if rank_zero_only.rank == 0 and resume.changes:
        write_json_atomic(path, changes)
    elif rank_zero_only.rank == 0 and not resume.path and os.path.exists(path):
        os.replace(path, os.path.join(run_dir, f"resume_changes-{time.strftime('%Y%m%d-%H%M%S')}.json"))


def prepare(cfg: DictConfig, a: Attempt) -> None:
    """The data (tokenizer, packed cache), the LightningModule around the one routing method object, the
    loggers, callbacks and Trainer."""
    a.dm, mcfg = build_data(cfg, a.spec.model)
    if a.resume.arch:
        check_same_arch(a.resume.arch, mcfg)
    counts = param_counts(mcfg)
    a.summary.update(total_params=counts["total"], active_params=counts["active"],
                     vocab_size=mcfg.padded_vocab_size, corpus=a.dm.corpus_fingerprint, seq_len=cfg.size.seq_len,
                     train_sequences=a.dm.train_sequences)
    a.lit = lit = LitLM(model=mcfg, routing=a.spec.knobs, method=a.spec.method,
                        optim=OmegaConf.to_container(cfg.optim, resolve=True),
                        routing_log_interval=cfg.routing_log_interval, tokenizer_json=a.dm.tokenizer.to_str())
    for layer in lit.model.moe_layers():  # the Stage I memory ceiling (experts.GroupedExperts)
        layer.experts.recompute_above = cfg.moe_recompute_above
    lit.model.set_pair_capacity(bounded_dispatch(cfg))  # ReMoE on a GPU: no host sync per layer
    if cfg.get("compile"):
        compile_blocks(lit.model)
    if rank_zero_only.rank == 0:
        a.dm.tokenizer.save(os.path.join(a.run_dir, "tokenizer.json"))
    a.loggers = _loggers(cfg)
    for lg in a.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if isinstance(lg, CSVLogger) and rank_zero_only.rank == 0:
            lg.start_at(a.resume.step)  # metrics.csv: keep the rows before it, drop the rest
    a.callbacks = _callbacks(cfg, a.run_dir, lit)
    a.trainer = instantiate(cfg.trainer, logger=a.loggers or False, callbacks=a.callbacks,
                            plugins=[checkpoint_io()])  # saves beside last.ckpt, then renames


def fit(cfg: DictConfig, a: Attempt) -> None:
    """Train, then validate the final model; the summary's outcome fields."""
    t_fit = time.time()
    a.trainer.fit(a.lit, datamodule=a.dm, ckpt_path=a.resume.path)
    fit_s = time.time() - t_fit
    val = a.trainer.validate(a.lit, datamodule=a.dm, verbose=False)[0]
    throughput = next(c for c in a.callbacks if isinstance(c, TrainThroughput))
    steps = a.trainer.global_step
    a.summary.update(
        status="completed", steps=steps, train_tokens=steps * cfg.size.global_batch_size * cfg.size.seq_len,
        val_loss=float(val["val/loss"]), val_ppl=math.exp(float(val["val/loss"])),
        tokens_per_s=throughput.tokens_per_s, fit_time_s=fit_s, resumed_from=a.resume.path,
        world_size=a.trainer.world_size, rank_states=a.lit.rank_states, **a.lit.routing.record(),
    )


def finish(cfg: DictConfig, a: Attempt) -> None:
    """The extended run's config; the routing analysis and downstream evaluation of the final model."""
    if rank_zero_only.rank == 0 and a.completed_before:
        write_text_atomic(os.path.join(a.run_dir, "config_resolved.yaml"), a.resolved)
    model = a.lit.whole_model()  # a collective under FSDP: every rank takes part
    if a.trainer.is_global_zero:
        _evaluate(cfg, a.trainer, a.lit, model, a.dm, a.run_dir, a.summary, a.loggers)
