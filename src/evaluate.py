"""Evaluate a checkpoint with lm-eval: `python src/evaluate.py checkpoint=PATH eval=local|paper`.

PATH: a training checkpoint (a file, or a sharded folder of trainer=fsdp), or a folder written by src/export.py.

Results land in the checkpoint's run directory (summary.json `downstream`, lm_eval_results.json), or in
out=<folder>; `eval=local` rebuilds the offline tasks from that run's own held-out split. Everything that
can be checked is checked before a model is loaded: bad input is one line and exit code 2 (remoe.cli).
"""

from remoe.cpu import reexec_with_malloc_settings

reexec_with_malloc_settings()  # before torch loads: glibc reads these at start-up (remoe/cpu.py)

import os

import hydra
from omegaconf import DictConfig

from remoe.cli import UsageError, guard, task
from remoe.console import quiet_third_party
from remoe.eval.adapter import DTYPES
from remoe.eval.run import check_eval, check_tasks, dumps, evaluate_checkpoint, evaluation_target

quiet_third_party()


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@task("evaluate")
def main(cfg: DictConfig) -> None:
    if cfg.dtype not in DTYPES:
        raise UsageError(f"dtype: one of {', '.join(DTYPES)} (got {cfg.dtype!r})")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        raise UsageError(f"seed: an int in [0, 2^32) (got {cfg.seed!r})")
    if str(cfg.device).split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device: cpu, cuda[:N] or mps (got {cfg.device!r})")
    _, run_dir, _ = evaluation_target(cfg)  # before any model is loaded
    check_eval(cfg.eval)
    check_tasks(cfg.eval.suite, cfg.eval.tasks)
    results = evaluate_checkpoint(cfg)
    print(dumps(results))
    print(f"evaluate: updated {os.path.join(run_dir, 'summary.json')} (downstream, downstream_meta) and wrote "
          f"{os.path.join(run_dir, 'lm_eval_results.json')}", flush=True)


if __name__ == "__main__":
    guard(main, "evaluate")
