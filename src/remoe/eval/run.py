"""Evaluate a model with lm-eval and store the results in its run directory.

`downstream` in summary.json: task -> metric -> value, with every metric lm-eval returns (stderr too);
lm-eval's whole results JSON goes beside it as lm_eval_results.json.
"""

from __future__ import annotations

import json
import math
import os

from ..runs import SUMMARY, read_summary, write_json_atomic
from .tasks import LOCAL_TASKS, PAPER_TASKS

SUITES = {"local": LOCAL_TASKS, "paper": PAPER_TASKS}


class HubUnavailable(RuntimeError):
    pass


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_tasks(suite: str, tasks: list[str] | None, include_path: str | None = None) -> list[str]:
    """Task names for a suite, each known to lm-eval; raises before any compute."""
    from lm_eval.tasks import TaskManager

    if suite not in SUITES:
        raise ValueError(f"eval.suite: unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    names = list(tasks or SUITES[suite])
    if suite == "local":
        unknown = [t for t in names if t not in LOCAL_TASKS]
    else:
        tm = TaskManager(include_path=include_path)
        unknown = [t for t in names if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"eval.tasks: unknown to lm-eval: {unknown}")
    if suite == "paper" and not hub_reachable():
        raise HubUnavailable(
            "eval=paper needs the HuggingFace hub to download ARC, BoolQ, HellaSwag, LAMBADA, PIQA and RACE, "
            "and it cannot be reached from here. Use eval=local (offline tasks built from the held-out "
            "split), or run where the hub is reachable (or with those datasets already in the HF cache).")
    return names


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


def evaluate_checkpoint(cfg) -> dict:
    """Standalone evaluation of a checkpoint (src/evaluate.py); the local suite is rebuilt from the data
    config recorded in the run directory."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .adapter import load_checkpoint

    ckpt = os.path.abspath(cfg.checkpoint)
    if os.path.isdir(ckpt):  # a folder written by src/export.py; results go into it unless out= says
        from ..export import TRAINING_CONFIG, load_hf

        model, tokenizer, _ = load_hf(ckpt)
        run_dir, resolved = cfg.out or ckpt, os.path.join(ckpt, TRAINING_CONFIG)
    else:
        run_dir = cfg.out or os.path.dirname(os.path.dirname(ckpt))
        model, tokenizer, _ = load_checkpoint(ckpt)
        resolved = os.path.join(run_dir, "config_resolved.yaml")
    dm = None
    if cfg.eval.suite == "local":
        if not os.path.exists(resolved):
            raise FileNotFoundError(f"eval=local needs the run's resolved config (looked for {resolved})")
        dm = instantiate(OmegaConf.load(resolved).data)
    results, _ = evaluate_model(model, tokenizer, cfg.eval, run_dir, datamodule=dm, seed=cfg.seed,
                                device=cfg.device, dtype=cfg.dtype, source=ckpt)
    return results
