"""Plan a run before launching it: `python src/plan.py size=182m model=remoe experts=128 trainer=ddp
cluster.nodes=2` prints parameters, training state and activations per GPU under DDP, FSDP and FSDP
hybrid, FLOPs per token, wall time, and which strategies fit (remoe/plan.py). Nothing is trained; the
same overrides as train.py. Exit code 2 on a bad config, 1 when the chosen strategy does not fit.
"""

from remoe.cpu import reexec_with_malloc_settings

reexec_with_malloc_settings()  # before torch loads: glibc reads these at start-up (remoe/cpu.py)

import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from remoe.cli import guard
from remoe.console import quiet_third_party
from remoe.model.presets import CONF_DIR
from remoe.plan import check_fits, describe, plan_for, strategy_of
from remoe.resolvers import register_resolvers
from remoe.train.spec import derive, validate

register_resolvers()
quiet_third_party()


def main() -> None:
    """Composes conf/ like train.py (no run folder is made: nothing runs)."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=sys.argv[1:], return_hydra_config=True)
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra")
    mcfg = validate(cfg).model  # ConfigError: one line, exit 2 (remoe.cli)
    derive(cfg)
    p = plan_for(cfg, mcfg)
    print(describe(p))
    why = check_fits(p, strategy_of(cfg.trainer))
    print(
        f"chosen strategy {strategy_of(cfg.trainer)}: " + ("fits" if why is None else f"does not fit: {why}")
    )
    sys.exit(0 if why is None else 1)


if __name__ == "__main__":
    guard(main, "plan")
