"""Evaluate a model with lm-eval and store the results in its run directory.

`downstream` in summary.json: task -> metric -> value, with every metric lm-eval returns (stderr too);
lm-eval's whole results JSON goes beside it as lm_eval_results.json.
"""

from __future__ import annotations

import json
import math
import os
import socket

from ..checkpoint import CheckpointError, is_sharded, load_checkpoint, open_checkpoint, run_dir_of
from ..cli import UsageError, unwritable
from ..data.datamodule import LMDataModule
from ..export import TRAINING_CONFIG, is_export, load_hf
from ..io import write_json_atomic
from ..train.record import SUMMARY, read_summary
from .tasks import LOCAL_TASKS, PAPER_TASKS

SUITES = {"local": LOCAL_TASKS, "paper": PAPER_TASKS}


class HubUnavailable(UsageError):
    """eval=paper where the HF hub cannot be reached: one line saying what to use instead."""


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_tasks(suite: str, tasks: list[str] | None, include_path: str | None = None) -> list[str]:
    """Task names for a suite, each known to lm-eval; raises before any compute."""
    from lm_eval.tasks import TaskManager

    if suite not in SUITES:
        raise UsageError(f"eval.suite: unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if tasks is not None and not (hasattr(tasks, "__iter__") and all(isinstance(t, str) for t in tasks)):
        raise UsageError(f"eval.tasks: a list of task names or null (got {tasks!r})")
    names = list(tasks or SUITES[suite])
    if suite == "local":
        unknown = [t for t in names if t not in LOCAL_TASKS]
    else:
        tm = TaskManager(include_path=include_path)
        unknown = [t for t in names if t not in tm.all_tasks]
    if unknown:
        raise UsageError(f"eval.tasks: unknown to lm-eval: {unknown}")
    if suite == "paper" and not hub_reachable():
        raise HubUnavailable(
            "eval=paper needs the HuggingFace hub to download ARC, BoolQ, HellaSwag, LAMBADA, PIQA and RACE, "
            "and it cannot be reached from here. Use eval=local (offline tasks built from the held-out "
            "split), or run where the hub is reachable (or with those datasets already in the HF cache).")
    return names


def check_eval(e) -> None:
    """The eval group's numbers (conf/eval/*.yaml): UsageError naming the key."""
    def positive(key: str, value, none_ok: bool, zero_ok: bool = False) -> None:
        if value is None and none_ok:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
            raise UsageError(f"eval.{key}: must be an int >= {0 if zero_ok else 1}"
                             f"{' or null' if none_ok else ''} (got {value!r})")

    for key, none_ok, zero_ok in (("n_docs", True, False), ("limit", True, False), ("batch_size", False, False),
                                  ("bootstrap_iters", False, True)):
        if key in e:
            positive(key, e.get(key), none_ok, zero_ok)


def flatten(results: dict) -> dict:
    """lm-eval's {"task": {"acc,none": v, "acc_stderr,none": s, "alias": ...}} ->
    {"task": {"acc": v, ...}}."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            name = key.split(",")[0]
            row[name] = None if isinstance(value, float) and not math.isfinite(value) else value
        out[task] = row
    return out


def evaluate(lm, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             bootstrap_iters: int = 0, seed: int = 0) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=include_path), limit=limit,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )


def store(run_dir: str, results: dict, suite: str, source: str = "training") -> dict:
    """Write lm_eval_results.json and add `downstream` + `downstream_meta` to the run's summary.json
    (atomically, every other field kept as stored); returns those two fields. source: where the evaluated
    weights came from ("training": the final model in the training process; else a checkpoint's path)."""
    write_json_atomic(os.path.join(run_dir, "lm_eval_results.json"), results)
    fields = {"downstream": flatten(results),
              "downstream_meta": {"suite": suite, "lm_eval": results.get("versions", {}),
                                  "n_samples": results.get("n-samples", {}), "source": source}}
    write_json_atomic(os.path.join(run_dir, SUMMARY), {**(read_summary(run_dir) or {}), **fields})
    return fields


def dumps(results: dict) -> str:
    return json.dumps(flatten(results), indent=2, sort_keys=True)


def evaluate_model(model, tokenizer, e, run_dir: str, *, datamodule=None, seed: int = 0, device: str = "cpu",
                   dtype: str = "float32", source: str = "training") -> tuple[dict, dict]:
    """lm-eval on a model, results stored in its run directory: (lm-eval's results, the summary fields
    written). `e` is an eval config (conf/eval); the local suite is built from `datamodule`'s held-out
    split. Used by training (the final model) and by src/evaluate.py (a checkpoint)."""
    from .adapter import RemoeLM
    from .tasks import build_local_tasks

    include = None
    if e.suite == "local":
        include = build_local_tasks(datamodule.validation_texts(), os.path.join(datamodule.cache_dir, "eval"),
                                    n=e.n_docs)
    lm = RemoeLM(model=model, tokenizer=tokenizer, device=device, batch_size=e.batch_size, dtype=dtype)
    tasks = list(e.tasks) if e.tasks else list(SUITES[e.suite])
    results = evaluate(lm, tasks, include_path=include, limit=e.limit, bootstrap_iters=e.bootstrap_iters,
                       seed=seed)
    return results, store(run_dir, results, e.suite, source)


def data_module_from_record(resolved: str):
    """The training run's data module, rebuilt from its recorded config (config_resolved.yaml, or an export's
    training_config.yaml) to build the local suite from its held-out split. Only remoe's LMDataModule is
    built, from plain values: a record's `_target_` is never instantiated (a file someone hands you must not
    name the code that runs)."""
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(resolved), resolve=False).get("data")
    except Exception as e:
        raise CheckpointError(f"checkpoint: {resolved} cannot be read ({type(e).__name__})") from None
    target = data.pop("_target_", "remoe.data.LMDataModule") if isinstance(data, dict) else None
    if target not in ("remoe.data.LMDataModule", "remoe.data.datamodule.LMDataModule") or any(
            isinstance(v, dict) and "_target_" in v for v in data.values()):
        raise CheckpointError(f"checkpoint: {resolved} has no remoe data section (data._target_ {target!r}); "
                              "eval=local cannot rebuild its held-out split")
    try:
        return LMDataModule(**data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint: {resolved}: its data section is not one remoe writes "
                              f"({str(e).splitlines()[0][:160]})") from None


def evaluation_target(cfg) -> tuple[str, str, str | None]:
    """(what the checkpoint is: "export" | "checkpoint", the folder results go to, the recorded training
    config eval=local needs) for src/evaluate.py, checked before any model is loaded: a missing or foreign
    path, a checkpoint outside a run folder without out=, a folder results cannot be written to, a local
    suite without the run's recorded config: each a UsageError naming it."""
    ckpt = os.path.abspath(str(cfg.checkpoint))
    if not os.path.exists(ckpt):
        raise CheckpointError(f"checkpoint: no such file or folder {ckpt!r}")
    if os.path.isdir(ckpt) and not is_sharded(ckpt):
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            raise CheckpointError(f"checkpoint: {ckpt!r} is a folder holding neither a sharded checkpoint "
                                  "(meta.pt) nor an exported model (config.json)")
        if not is_export(ckpt):
            raise CheckpointError(f"checkpoint: {ckpt!r} was not exported by remoe (config.json has no 'remoe')")
        kind, run_dir, resolved = "export", cfg.out or ckpt, os.path.join(ckpt, TRAINING_CONFIG)
    else:
        open_checkpoint(ckpt)  # truncated, empty, foreign: refused before anything else
        kind, run_dir = "checkpoint", cfg.out or run_dir_of(ckpt)
        if run_dir is None:
            raise UsageError(f"out: {ckpt} is not in a run folder (<run>/checkpoints/); give out=<folder> for "
                             "the results")
        resolved = os.path.join(run_dir_of(ckpt) or run_dir, "config_resolved.yaml")
    run_dir = os.path.abspath(str(run_dir))
    if unwritable(run_dir) or (os.path.exists(os.path.join(run_dir, SUMMARY))
                               and not os.access(os.path.join(run_dir, SUMMARY), os.R_OK)):
        raise UsageError(f"out: cannot write the results into {run_dir} (read-only or no permission); give "
                         "out=<a writable folder>")
    if cfg.eval.suite == "local" and not os.path.isfile(resolved):
        raise UsageError(f"eval=local rebuilds its tasks from the run's recorded config, and there is none at "
                         f"{resolved}; use eval=paper, or evaluate the run's own checkpoint")
    return kind, run_dir, resolved


def evaluate_checkpoint(cfg) -> dict:
    """Standalone evaluation of a checkpoint (src/evaluate.py); the local suite is rebuilt from the data
    config recorded in the run directory. Returns lm-eval's results; writes into the target folder
    (evaluation_target) lm_eval_results.json and summary.json's `downstream`."""
    kind, run_dir, resolved = evaluation_target(cfg)
    if kind == "export":
        model, tokenizer, _ = load_hf(os.path.abspath(cfg.checkpoint))
    else:
        model, tokenizer, _ = load_checkpoint(os.path.abspath(cfg.checkpoint))
    dm = data_module_from_record(resolved) if cfg.eval.suite == "local" else None
    results, _ = evaluate_model(model, tokenizer, cfg.eval, run_dir, datamodule=dm, seed=cfg.seed,
                                device=cfg.device, dtype=cfg.dtype, source=os.path.abspath(cfg.checkpoint))
    return results
