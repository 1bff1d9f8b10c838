"""Each routing method's training knobs, declared once: a frozen dataclass per method whose defaults are the
method's standard setting (the paper's). The method class (routing.py) takes its `Knobs` from here; Hydra gets
the same defaults from it (register_knob_configs: ConfigStore node `_knobs/<method>`, which
conf/model/<method>.yaml includes), and the report reads a run's distance from them (summary.json
off_standard). Torch-free, so that composing the config (train.py --help) does not load torch.

A method with knobs: a dataclass here (or beside the method, for one defined elsewhere) declared with
`method="<name>"`, and `Knobs = <that class>` on the method. A method without knobs keeps the empty `Knobs`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .config import ConfigFieldError

KNOBS_GROUP = "_knobs"  # conf/model/<name>.yaml: defaults: [/_knobs/<name>@_here_, _self_]


@dataclass(frozen=True)
class Knobs:
    """No knobs. A subclass adds fields (each default: the method's standard setting) and checks their values
    in __post_init__, raising ConfigFieldError naming the field; `method=` registers it for Hydra."""

    registry: ClassVar[dict[str, type[Knobs]]] = {}

    def __init_subclass__(cls, method: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if method is not None:
            Knobs.registry[method] = cls


@dataclass(frozen=True)
class TopKKnobs(Knobs, method="topk"):
    aux_loss_coef: float = 1e-2  # the Switch loss's fixed coefficient
    load_balancing: bool = True  # false: no aux loss (the "no LB" ablation; the yaml sets it from the global key)
    warmup_topk: int | None = None  # near-dense warm-up: k during the first warmup_steps steps
    warmup_steps: int = 0

    def __post_init__(self):
        if not self.aux_loss_coef >= 0:
            raise ConfigFieldError("aux_loss_coef", f"must be >= 0 (got {self.aux_loss_coef!r})")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ConfigFieldError("warmup_steps", f"must be an int >= 0 (got {self.warmup_steps!r})")


@dataclass(frozen=True)
class ReMoEKnobs(Knobs, method="remoe"):
    regularizer: str = "lb_l1"  # lb_l1 (the paper's) or l1 (checked by ReMoE, which maps them to losses)
    load_balancing: bool = True  # false: plain L1 (the "no LB" ablation)
    lambda0: float = 1e-8  # the adaptive coefficient's initial value (>= LAMBDA_FLOOR: checked by ReMoE) ...
    alpha: float = 1.2  # ... and multiplicative step
    lambda_per_layer: bool = False  # true: one controller per layer (an option; the paper has one, global)

    def __post_init__(self):
        if not self.alpha > 1:
            raise ConfigFieldError("alpha", f"must be > 1 (got {self.alpha!r})")
        if not isinstance(self.lambda_per_layer, bool):
            raise ConfigFieldError("lambda_per_layer", f"must be true or false (got {self.lambda_per_layer!r})")


@dataclass(frozen=True)
class AuxFreeKnobs(Knobs, method="auxfree"):
    bias_update_rate: float = 1e-3  # u in b_e += u sign(mean load - load_e)
    load_balancing: bool = True  # false: the bias stays 0 (the "no LB" ablation)

    def __post_init__(self):
        if not self.bias_update_rate >= 0:
            raise ConfigFieldError("bias_update_rate", f"must be >= 0 (got {self.bias_update_rate!r})")


def register_knob_configs() -> None:
    """Put every registered method's knob defaults into Hydra's ConfigStore as `_knobs/<method>`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, cls in Knobs.registry.items():
        cs.store(group=KNOBS_GROUP, name=name, node=dataclasses.asdict(cls()))
