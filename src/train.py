"""Train one model (or a grid with -m): `python src/train.py model=remoe experts=16 seed=2`.

Thin by design: Hydra composes conf/, remoe.pipeline.run does the work. A bad config value exits
with status 2 and a one-line message naming the key, before any data or model is built.
"""

from remoe.cpu import reexec_with_malloc_settings

reexec_with_malloc_settings()  # before torch loads: glibc reads these at start-up (remoe/cpu.py)

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from remoe.console import quiet_third_party
from remoe.pipeline import run
from remoe.settings import ConfigError, register_resolvers

register_resolvers()
quiet_third_party()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        logging.getLogger("remoe").error("config error: %s", e)
        sys.exit(2)
    return summary.get("val_loss")  # for Hydra sweepers


if __name__ == "__main__":
    main()
