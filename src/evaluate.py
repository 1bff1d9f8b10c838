"""Evaluate a checkpoint with lm-eval: `python src/evaluate.py checkpoint=PATH eval=local|paper`.

PATH: a training checkpoint, or a folder written by src/export.py.

Results land in the checkpoint's run directory (summary.json `downstream`, lm_eval_results.json);
`eval=local` rebuilds the offline tasks from that run's own held-out split.
"""

from remoe.cpu import reexec_with_malloc_settings

reexec_with_malloc_settings()  # before torch loads: glibc reads these at start-up (remoe/cpu.py)

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from remoe.console import quiet_third_party
from remoe.eval.run import HubUnavailable, check_tasks, dumps, evaluate_checkpoint

quiet_third_party()

log = logging.getLogger("remoe")


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        if not (os.path.isfile(cfg.checkpoint) or os.path.isfile(os.path.join(cfg.checkpoint, "config.json"))):
            raise ValueError(f"checkpoint: no checkpoint file or exported folder (config.json) at {cfg.checkpoint!r}")
        check_tasks(cfg.eval.suite, cfg.eval.tasks)
    except (HubUnavailable, ValueError) as e:
        log.error("%s", e)
        sys.exit(2)
    results = evaluate_checkpoint(cfg)
    print(dumps(results))


if __name__ == "__main__":
    main()
