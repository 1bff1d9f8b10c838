"""Train one model (or a grid with -m): `python src/train.py model=remoe experts=16 seed=2`.

Thin by design: Hydra composes conf/, remoe.train.run.run does the work. A bad config value exits
with status 2 and a one-line message naming the key, before any data or model is built (and, for a single
run, before Hydra makes its folder: remoe.hydra_callbacks.ValidateOnRunStart); remoe.cli says the rest.
"""

from remoe.cpu import reexec_with_malloc_settings

reexec_with_malloc_settings()  # before torch loads: glibc reads these at start-up (remoe/cpu.py)

import os

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from remoe.cli import RunFailed, fail, first_line, guard
from remoe.console import quiet_third_party
from remoe.resolvers import register_resolvers, run_mode_defaults

register_resolvers()
quiet_third_party()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from remoe.train.run import run  # torch and Lightning load here: `--help` never waits for them
    from remoe.train.spec import ConfigError

    run_dir = HydraConfig.get().runtime.output_dir
    run_mode_defaults(cfg, HydraConfig.get().mode == RunMode.MULTIRUN)
    try:
        summary = run(cfg, run_dir=run_dir)
    except ConfigError as e:  # inside a -m grid too: it stops the grid at once
        fail(e, "train")
    except Exception as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra keeps it: the grid's other points still run, and the command ends non-zero
        fail(RunFailed(f"failed: {type(e).__name__}: {first_line(e)} (record and traceback: "
                       f"{os.path.join(run_dir, 'summary.json')})"), "train")
    return summary.get("val_loss")  # for Hydra sweepers


if __name__ == "__main__":
    guard(main, "train")
