"""Routing methods: one object per method owns everything that differs between methods.

A method builds the FFN of each block (its router feeding the grouped experts; architecture only, so a
stored model is rebuilt from its ModelConfig alone), turns the layers' router outputs into its routing
loss (per layer, then combined over layers), holds the loss coefficient and any controller state
(ReMoE's lambda) updated once per optimizer step from the all-reduced routing counts, checkpoints that
state, and names what it adds to the logs and to summary.json. The transformer, the LightningModule and
the pipeline call this interface and never compare a method's name.

Each method declares its training knobs once, as a frozen dataclass (knobs.py: defaults = the method's
standard setting; Hydra's model group gets them from it too), and says what the report reads instead of
its name: summary.json `off_standard` (the knobs and router options a run sets away from their defaults)
and `load_balanced`.

Adding a method: a subclass with a new `name` here (it registers itself in METHODS), its knobs dataclass
(knobs.py, `method="<name>"`) if it has any, a conf/model/<name>.yaml (`defaults: [/_knobs/<name>@_here_,
_self_]` when it has knobs, then ModelConfig fields), and tests (a float64 naive reference for outputs and
every gradient).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .config import DENSE, ConfigFieldError, ModelConfig
from .experts import SwiGLU
from .knobs import AuxFreeKnobs, Knobs, ReMoEKnobs, TopKKnobs
from .moe import MoELayer
from .regularizers import LAMBDA_FLOOR, LambdaController, l1_loss, lb_l1_loss, switch_aux_loss
from .routers import AuxFreeRouter, ExpertChoiceRouter, HashRouter, ReLURouter, TopKRouter
from .stats import RoutingStats

if TYPE_CHECKING:
    from .transformer import ModelOutput, Transformer

METHODS: dict[str, type[RoutingMethod]] = {}
log = logging.getLogger("remoe")

# A layer has collapsed when its mean experts per token over the tail window (the last 10% of steps, at
# most TAIL) stays below COLLAPSE_FRACTION of its k (k*G): most tokens skip its FFN.
COLLAPSE_FRACTION = 0.1
TAIL = 50
WARN_WINDOW = 20  # steps over which training warns, once per layer, that a layer is collapsing


def settling_step(series: list[float], target: float, band: float = 0.05) -> int | None:
    """First index from which |S - target| <= band holds to the end of `series`; None if never."""
    last_out = -1
    for i, s in enumerate(series):
        if abs(s - target) > band:
            last_out = i
    return last_out + 1 if last_out + 1 < len(series) else None


def tail_mean(xs: list[float], frac: float = 0.1, cap: int = 50) -> float | None:
    """Mean of the last 10% of a series (at most 50 values): a late-training level, not one step's noise."""
    if not xs:
        return None
    n = tail_length(len(xs), frac, cap)
    return sum(xs[-n:]) / n


def tail_length(n: int, frac: float = 0.1, cap: int = TAIL) -> int:
    return max(1, min(cap, int(n * frac)))


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)  # null in summary.json, NaN in a report's table


class RoutingMethod:
    """The interface, and the dense FFN's (trivial) implementation of it: no router, no loss, no state."""

    Knobs: ClassVar[type[Knobs]] = Knobs

    name: ClassVar[str]
    moe: ClassVar[bool] = True  # the FFN is an MoE layer (routing statistics exist)
    loss_name: ClassVar[str | None] = None  # logged as train/<loss_name> and train/weighted_<loss_name>
    progress_bar: ClassVar[tuple[str, ...]] = ()  # logged keys to show in the progress bar
    arch_options: ClassVar[tuple[str, ...]] = ()  # the ModelConfig router options this method reads
    dense_start: ClassVar[bool] = False  # routes most tokens to most experts in its first steps (memory plan)
    # False: a token's experts depend on the other tokens of its forward (said on an exported model's card)
    causal: ClassVar[bool] = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            if cls.moe != (cls.name != DENSE):  # ModelConfig.is_moe reads the name
                raise TypeError(f"routing method {cls.name!r}: moe={cls.moe}, but only {DENSE!r} has no experts")
            METHODS[cls.name] = cls

    def __init__(self, cfg: ModelConfig, knobs: Knobs | None = None, **values):
        """`knobs`, or its fields as keyword arguments (build_method names an unknown one)."""
        if cfg.routing != self.name:
            raise ValueError(f"routing method {self.name!r} given a model config for {cfg.routing!r}")
        self.cfg = cfg
        self.knobs = knobs if knobs is not None else self.Knobs(**values)
        self.sparsity_history: list[float] = []  # S_i of every optimizer step (checkpointed)
        # global step of sparsity_history[0]: > 0 after resuming a format-1 checkpoint written before bc4556f,
        # which did not hold the history
        self.history_start = 0
        self.layer_tail: list[list[float]] = []  # experts per token of each layer, the last TAIL steps
        self.warned: set[int] = set()  # layers already reported as collapsing
        self.said_recovered: set[int] = set()  # warned layers reported as recovered at the end

    def rebind(self, cfg: ModelConfig) -> RoutingMethod:
        """This object for `cfg`, the architecture it was built for with the vocabulary the data gave (a run builds
        its method once, before the data: train.spec.RunSpec); any other difference is an error."""
        if dataclasses.replace(cfg, vocab_size=self.cfg.vocab_size) != self.cfg:
            raise ValueError(f"routing method built for {self.cfg}, not for {cfg}")
        self.cfg = cfg
        return self

    # ---- model side: architecture only ----------------------------------------------------------
    @classmethod
    def check_arch(cls, cfg: ModelConfig) -> None:
        """This method's checks of a model config (ConfigFieldError naming the field): a router option of another
        method must stay at its default; a method with options of its own checks their values (super() first)."""
        for f in dataclasses.fields(cfg):
            owners = [m for m, c in METHODS.items() if f.name in c.arch_options]
            if owners and cls.name not in owners and getattr(cfg, f.name) != f.default:
                raise ConfigFieldError(f.name, f"an option of routing {'/'.join(owners)}, not of {cls.name!r} "
                                       f"(got {getattr(cfg, f.name)!r})")

    @classmethod
    def build_ffn(cls, cfg: ModelConfig) -> nn.Module:
        return MoELayer(cfg, cls.build_router(cfg))

    @classmethod
    def build_router(cls, cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def router_params(cls, cfg: ModelConfig) -> int:
        return cfg.d_model * cfg.n_experts

    # ---- training side ------------------------------------------------------------------------
    def loss(self, out: ModelOutput) -> torch.Tensor:
        """The routing loss over all layers, before its coefficient."""
        return out.logits.new_zeros(())

    def coefficient(self) -> float:
        """The routing loss's weight in this step: loss = L_lm + coefficient() * loss(out)."""
        return 0.0

    def weighted_loss(self, out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(the routing loss, what is added to L_lm): coefficient() * loss(out) unless a method weights
        its layers apart (ReMoE with per-layer lambda)."""
        value = self.loss(out)
        return value, self.coefficient() * value

    def on_train_step_start(self, step: int, model: Transformer) -> None:
        """Before each training micro-batch of optimizer step `step`."""

    def on_optimizer_step(self, stats: RoutingStats, model: Transformer | None = None) -> dict[str, float]:
        """After each optimizer step, with that step's all-reduced counts (and the model, for state that lives
        in its routers): update state; returns what to log (the values used in the step just taken)."""
        self.sparsity_history.append(stats.sparsity)
        per_token = stats.layer_experts_per_token.tolist()
        self.layer_tail = (self.layer_tail + [per_token])[-TAIL:]
        recent = self.layer_tail[-WARN_WINDOW:]
        for layer in range(len(per_token)):
            mean = sum(row[layer] for row in recent) / len(recent)
            if len(recent) == WARN_WINDOW and mean < COLLAPSE_FRACTION * self.cfg.n_active \
                    and layer not in self.warned:
                self.warned.add(layer)
                log.warning("MoE layer %d may be collapsing at step %d: %.3f experts per token over the last %d "
                            "steps (k = %d), so most tokens skip its FFN. Often a transient dip while lambda "
                            "settles; the run's end says whether it recovered (summary.json collapsed_layers)",
                            layer, stats.step, mean, WARN_WINDOW, self.cfg.n_active)
        return {}

    def rank_state(self) -> dict[str, float] | None:
        """Values every data-parallel rank must agree on at the end of training (checked by all-gather)."""
        return None

    def state_dict(self) -> dict:
        """Checkpointed state, plain Python values (loads under torch.load(weights_only=True)). The sparsity
        history travels too, so a resumed run's summary (tail sparsity, settling step) is the same as an
        uninterrupted run's."""
        if not self.moe:
            return {}
        return {"sparsity_history": list(self.sparsity_history),
                "layer_tail": [list(r) for r in self.layer_tail]}

    def load_state_dict(self, state: dict) -> None:
        self.sparsity_history = list(state.get("sparsity_history", []))
        self.layer_tail = [list(r) for r in state.get("layer_tail", [])]

    def layer_summary(self) -> dict:
        """Per-layer sparsity over the tail window, and the layers that collapsed in it."""
        if not self.layer_tail:
            return {}
        n = min(len(self.layer_tail), tail_length(len(self.sparsity_history)))
        rows = self.layer_tail[-n:]
        per_token = [sum(r[i] for r in rows) / n for i in range(len(rows[0]))]
        collapsed = [i for i, e in enumerate(per_token) if e < COLLAPSE_FRACTION * self.cfg.n_active]
        for layer in sorted(self.warned - set(collapsed) - self.said_recovered):
            self.said_recovered.add(layer)
            log.info("MoE layer %d recovered after its collapse warning: %.3f experts per token over the last %d "
                     "steps (k = %d)", layer, per_token[layer], n, self.cfg.n_active)
        return {"layer_sparsity": [1 - e / self.cfg.n_experts for e in per_token], "collapsed_layers": collapsed}

    def summary(self) -> dict:
        """Fields this method adds to summary.json (names declared in train.record.RunSummary)."""
        if not self.moe:
            return {}
        c = self.cfg
        return {"experts": c.experts, "topk": c.topk, "granularity": c.granularity,
                "target_sparsity": c.target_sparsity,
                "sparsity_final": self.sparsity_history[-1] if self.sparsity_history else None,
                **self.layer_summary()}

    # ---- what the report reads: the standard setting and load balancing --------------------------
    @classmethod
    def standard(cls) -> dict[str, Any]:
        """The method's standard setting: each knob's default and each router option's (ModelConfig) default.
        An option whose default is null is derived from other fields (auxfree's norm_topk_prob: on iff
        k*G > 1) and defines no setting of its own."""
        arch = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.name in cls.arch_options and f.default is not None}
        return {**{f.name: f.default for f in dataclasses.fields(cls.Knobs)}, **arch}

    @classmethod
    def off_standard(cls, values: Mapping[str, Any]) -> list[str]:
        """The knobs and options `values` (a run's settings or its summary.json) set away from the standard
        setting. A value a record lacks (null: written before the knob existed) was the default."""
        return [k for k, v in cls.standard().items() if not _missing(values.get(k)) and values.get(k) != v]

    @classmethod
    def load_balanced(cls, values: Mapping[str, Any]) -> bool | None:
        """Whether a run with these settings (summary.json fields) has a load-balancing mechanism on; None
        for a dense FFN."""
        return False if cls.moe else None

    def record(self) -> dict:
        """Everything this method writes into summary.json: summary(), then off_standard and load_balanced
        of this run's knobs and router options (the summary's effective values, e.g. TopK's aux_loss_coef 0
        under load_balancing=false, over the knobs as given)."""
        summary = self.summary()
        values = {**dataclasses.asdict(self.knobs), **{o: getattr(self.cfg, o) for o in self.arch_options},
                  **summary}
        return {**summary, "off_standard": self.off_standard(values), "load_balanced": self.load_balanced(values)}


class Dense(RoutingMethod):
    """The dense LLaMA FFN (SwiGLU), optionally ffn_mult times wider ("Dense xM")."""

    name = DENSE
    moe = False
    arch_options = ("ffn_mult",)  # standard: 1 (the paper's "Dense"); 8 is its "Dense x8"

    @classmethod
    def build_ffn(cls, cfg: ModelConfig) -> nn.Module:
        return SwiGLU(cfg.d_model, cfg.ffn * cfg.ffn_mult)


class TopK(RoutingMethod):
    """TopK+softmax MoE (dMoE): pre-softmax top-k, gates not renormalised; Switch load-balancing loss
    E * sum_e f_e P_e per layer, summed over layers, at a fixed coefficient. Near-dense warm-up (optional):
    route to warmup_topk experts for the first warmup_steps steps, then to topk."""

    name = "topk"
    loss_name = "aux_loss"

    Knobs = TopKKnobs

    def __init__(self, cfg: ModelConfig, knobs: Knobs | None = None, **values):
        super().__init__(cfg, knobs, **values)
        kn = self.knobs
        if kn.warmup_topk is not None and not cfg.topk <= kn.warmup_topk <= cfg.experts:
            raise ConfigFieldError("warmup_topk",
                                   f"must be in [topk, experts={cfg.experts}] (got {kn.warmup_topk!r})")
        self.aux_loss_coef = float(kn.aux_loss_coef) if kn.load_balancing else 0.0  # LB ablation: no aux loss
        self.k = cfg.n_active  # k*G now (the warm-up raises it)

    @classmethod
    def load_balanced(cls, values: Mapping[str, Any]) -> bool:
        return not _missing(values.get("aux_loss_coef")) and values["aux_loss_coef"] > 0

    @classmethod
    def build_router(cls, cfg: ModelConfig) -> nn.Module:
        return TopKRouter(cfg.d_model, cfg.n_experts, cfg.n_active)

    def loss(self, out: ModelOutput) -> torch.Tensor:
        return torch.stack([switch_aux_loss(r.scores, r.gates, self.k) for r in out.routing]).sum()

    def coefficient(self) -> float:
        return self.aux_loss_coef

    def on_train_step_start(self, step: int, model: Transformer) -> None:
        kn = self.knobs
        if kn.warmup_topk is None:
            return
        k = kn.warmup_topk if step < kn.warmup_steps else self.cfg.topk
        self.k = k * self.cfg.granularity
        for m in model.moe_layers():
            m.router.k = self.k

    def summary(self) -> dict:
        return {**super().summary(), "aux_loss_coef": self.aux_loss_coef, "warmup_topk": self.knobs.warmup_topk,
                "warmup_steps": self.knobs.warmup_steps}


class ReMoE(RoutingMethod):
    """ReMoE: gates R = ReLU(x W_r), each token gets 0..E experts. Loss: L_reg = load-balancing refined L1
    (or plain L1) per layer, averaged over layers (the 1/(L T) of the paper's formula; the official code
    sums, which lambda absorbs as a factor L), weighted by lambda_i from the adaptive controller
    lambda_{i+1} = lambda_i * alpha^sign(target - S_i), target = 1 - k/E.

    lambda_per_layer (an option, not the paper's method): one controller per layer, each driving its own
    layer's sparsity to 1 - k/E from that layer's all-reduced counts, so no layer can meet the global
    target for another: loss = L_lm + (1/L) sum_l lambda_l L_reg^l."""

    name = "remoe"
    loss_name = "reg_loss"
    dense_start = True  # Stage I: ReLU passes ~half the gates at init, more before lambda catches up
    progress_bar = ("train/sparsity",)
    REGULARIZERS = {"lb_l1": lb_l1_loss, "l1": lambda gates, k: l1_loss(gates)}

    Knobs = ReMoEKnobs

    def __init__(self, cfg: ModelConfig, knobs: Knobs | None = None, **values):
        super().__init__(cfg, knobs, **values)
        kn = self.knobs
        if kn.regularizer not in self.REGULARIZERS:
            raise ConfigFieldError("regularizer",
                                   f"choose one of {sorted(self.REGULARIZERS)} (got {kn.regularizer!r})")
        if not kn.lambda0 >= LAMBDA_FLOOR:
            raise ConfigFieldError("lambda0", f"must be >= {LAMBDA_FLOOR:.3g}, float32's smallest normal "
                                   f"number (got {kn.lambda0!r})")
        self.regularizer = kn.regularizer if kn.load_balancing else "l1"  # LB ablation: plain L1
        n = cfg.n_layer if kn.lambda_per_layer else 1
        self.controllers = [LambdaController(cfg.target_sparsity, kn.lambda0, kn.alpha) for _ in range(n)]

    @classmethod
    def load_balanced(cls, values: Mapping[str, Any]) -> bool:
        return values.get("regularizer") == "lb_l1"

    @property
    def controller(self) -> LambdaController:
        """The global controller (the paper's method)."""
        return self.controllers[0]

    @classmethod
    def build_router(cls, cfg: ModelConfig) -> nn.Module:
        return ReLURouter(cfg.d_model, cfg.n_experts)

    def _layer_losses(self, out: ModelOutput) -> list[torch.Tensor]:
        reg = self.REGULARIZERS[self.regularizer]
        return [reg(r.gates, self.cfg.n_active) for r in out.routing]

    def loss(self, out: ModelOutput) -> torch.Tensor:
        return torch.stack(self._layer_losses(out)).mean()

    def coefficient(self) -> float:
        return sum(c.value for c in self.controllers) / len(self.controllers)

    def weighted_loss(self, out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.knobs.lambda_per_layer:
            return super().weighted_loss(out)
        layers = self._layer_losses(out)
        weighted = torch.stack([c.value * r for c, r in zip(self.controllers, layers)]).mean()
        return torch.stack(layers).mean(), weighted

    def on_optimizer_step(self, stats: RoutingStats, model: Transformer | None = None) -> dict[str, float]:
        super().on_optimizer_step(stats)
        used = [c.value for c in self.controllers]  # lambda_i, the values this step was trained with
        if self.knobs.lambda_per_layer:  # each layer on its own integer counts
            for c, below in zip(self.controllers, stats.layer_below_target(self.cfg.n_active)):
                c.step(below)
            return {"train/lambda": sum(used) / len(used),
                    **{f"lambda/layer_{i}": v for i, v in enumerate(used)}}
        self.controller.step(stats.below_target(self.cfg.n_active))  # on integer counts, not a float mean
        return {"train/lambda": used[0]}

    def rank_state(self) -> dict[str, float] | None:
        if not self.sparsity_history:
            return None
        lambdas = {"lambda": self.controller.value} if not self.knobs.lambda_per_layer else \
            {f"lambda_l{i}": c.value for i, c in enumerate(self.controllers)}
        return {**lambdas, "sparsity": self.sparsity_history[-1]}

    def state_dict(self) -> dict:
        if self.knobs.lambda_per_layer:
            return {**super().state_dict(), "lambda_controllers": [c.state_dict() for c in self.controllers]}
        return {**super().state_dict(), "lambda_controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """lambda and the controller's step count resume from the checkpoint; alpha is this run's knob
        (a resume may change it; target is architecture, checked equal before resuming)."""
        super().load_state_dict(state)
        saved = state.get("lambda_controllers") or \
            ([state["lambda_controller"]] if "lambda_controller" in state else [])
        if saved and len(saved) != len(self.controllers):
            raise ValueError(f"the checkpoint holds {len(saved)} lambda controller(s), this run "
                             f"{len(self.controllers)}: lambda_per_layer cannot change on resume")
        for c, st in zip(self.controllers, saved):
            c.load_state_dict({**st, "alpha": float(self.knobs.alpha)})

    def summary(self) -> dict:
        i = settling_step(self.sparsity_history, self.cfg.target_sparsity)
        kn, per_layer = self.knobs, self.knobs.lambda_per_layer
        return {**super().summary(), "regularizer": self.regularizer, "lambda0": float(kn.lambda0),
                "alpha": float(kn.alpha), "lambda_per_layer": per_layer,
                "lambda": None if per_layer else self.controller.value,
                "layer_lambda": [c.value for c in self.controllers] if per_layer else None,
                "sparsity": tail_mean(self.sparsity_history),
                "settling_step": None if i is None else self.history_start + i}


class Hash(RoutingMethod):
    """Hash layers (Roller et al., 2021): each token id goes to k*G fixed distinct experts of a seeded,
    balanced hash of the vocabulary (routers.balanced_hash; the table is a model buffer, so it is in every
    checkpoint), gate 1. No router parameters, no loss, nothing to balance: the load follows the token
    frequencies."""

    name = "hash"

    @classmethod
    def build_router(cls, cfg: ModelConfig) -> nn.Module:
        return HashRouter(cfg.padded_vocab_size, cfg.n_experts, cfg.n_active)

    @classmethod
    def router_params(cls, cfg: ModelConfig) -> int:
        return 0


class ExpertChoice(RoutingMethod):
    """Expert Choice (Zhou et al., 2022): each expert takes its top-C tokens of the forward's batch by
    softmax score, C = capacity_factor * T * k / E; gate = the score; no balancing loss (every expert
    gets exactly C tokens). Not causal across the batch (routers.ExpertChoiceRouter): evaluated as the
    paper did, on the batches the evaluator forms."""

    name = "ec"
    arch_options = ("capacity_factor",)
    causal = False

    @classmethod
    def check_arch(cls, cfg: ModelConfig) -> None:
        super().check_arch(cfg)
        c = cfg.capacity_factor
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ConfigFieldError("capacity_factor", f"must be > 0 (got {c!r})")

    @classmethod
    def load_balanced(cls, values: Mapping[str, Any]) -> bool:
        return True  # every expert takes C tokens by construction

    @classmethod
    def build_router(cls, cfg: ModelConfig) -> nn.Module:
        return ExpertChoiceRouter(cfg.d_model, cfg.n_experts, cfg.n_active, cfg.capacity_factor)

    def summary(self) -> dict:
        return {**super().summary(), "capacity_factor": self.cfg.capacity_factor}


class AuxFree(RoutingMethod):
    """Auxiliary-loss-free load balancing (Wang et al., 2024, DeepSeek-V3): top-k on sigmoid (or softmax)
    affinity + a per-expert bias; after each optimizer step every layer's bias moves by
    bias_update_rate * sign(mean load - load_e) on the step's all-reduced counts, so under-loaded experts
    are chosen more. The bias selects only (gates are the affinities, routers.AuxFreeRouter). No loss:
    DeepSeek-V3's extra sequence-wise balance loss (alpha = 1e-4) is not included."""

    name = "auxfree"
    arch_options = ("score_func", "norm_topk_prob")

    @classmethod
    def check_arch(cls, cfg: ModelConfig) -> None:
        super().check_arch(cfg)
        if cfg.score_func not in ("sigmoid", "softmax"):
            raise ConfigFieldError("score_func", f"choose sigmoid or softmax (got {cfg.score_func!r})")
        if not (cfg.norm_topk_prob is None or isinstance(cfg.norm_topk_prob, bool)):
            raise ConfigFieldError("norm_topk_prob", "must be true, false or null (null: on iff topk*granularity > 1) "
                                   f"(got {cfg.norm_topk_prob!r})")
        if cfg.norm_topk_prob and cfg.n_active == 1:
            raise ConfigFieldError("norm_topk_prob", "at one active expert every normalised gate is 1 and the router "
                                   f"gets no gradient (got {cfg.norm_topk_prob!r})")

    Knobs = AuxFreeKnobs

    def __init__(self, cfg: ModelConfig, knobs: Knobs | None = None, **values):
        super().__init__(cfg, knobs, **values)
        self.bias_update_rate = float(self.knobs.bias_update_rate) if self.knobs.load_balancing else 0.0
        self.bias: torch.Tensor | None = None  # (L, E) after the latest update (the model's buffers hold it)

    @classmethod
    def load_balanced(cls, values: Mapping[str, Any]) -> bool:
        return not _missing(values.get("bias_update_rate")) and values["bias_update_rate"] > 0

    @classmethod
    def build_router(cls, cfg: ModelConfig) -> nn.Module:
        return AuxFreeRouter(cfg.d_model, cfg.n_experts, cfg.n_active, cfg.score_func, cfg.normalizes_gates)

    def on_optimizer_step(self, stats: RoutingStats, model: Transformer | None = None) -> dict[str, float]:
        super().on_optimizer_step(stats)
        if model is None:
            raise ValueError("auxfree updates the expert bias held by the model's routers: pass the model")
        load = torch.as_tensor(stats.counts, dtype=torch.float32)
        step = self.bias_update_rate * torch.sign(load.mean(-1, keepdim=True) - load)
        for layer, delta in zip(model.moe_layers(), step):
            layer.router.expert_bias += delta.to(layer.router.expert_bias.device)
        self.bias = torch.stack([m.router.expert_bias for m in model.moe_layers()]).cpu().double()
        return {"train/expert_bias_absmax": float(self.bias.abs().max())}

    def rank_state(self) -> dict[str, float] | None:
        """The biases every rank updated on its own from the same all-reduced counts: a weighted checksum."""
        if self.bias is None:
            return None
        weights = torch.arange(1, self.bias.numel() + 1, dtype=torch.float64).reshape(self.bias.shape)
        return {"expert_bias_checksum": float((self.bias * weights).sum())}

    def summary(self) -> dict:
        return {**super().summary(), "score_func": self.cfg.score_func,
                "norm_topk_prob": self.cfg.normalizes_gates, "bias_update_rate": self.bias_update_rate}


def method_of(cfg: ModelConfig) -> type[RoutingMethod]:
    """The routing method class of a model config, after the method's checks of it (check_arch); an unknown
    method or a bad router option raises ConfigFieldError naming the field."""
    cls = METHODS.get(cfg.routing)
    if cls is None:
        raise ConfigFieldError("routing", f"unknown routing method; choose one of {sorted(METHODS)} "
                               f"(got {cfg.routing!r})")
    cls.check_arch(cfg)
    return cls


def build_method(cfg: ModelConfig, **knobs) -> RoutingMethod:
    """The routing method object of a model config, with its training knobs; a bad or unknown knob
    raises ConfigFieldError naming it."""
    cls = method_of(cfg)
    accepted = {f.name for f in dataclasses.fields(cls.Knobs)}
    unknown = sorted(set(knobs) - accepted)
    if unknown:
        raise ConfigFieldError(unknown[0], f"not an option of routing method {cfg.routing!r} "
                               f"(options: {sorted(accepted) or 'none'})")
    return cls(cfg, **knobs)
