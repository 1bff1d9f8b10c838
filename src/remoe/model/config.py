"""The architecture of one model: a frozen, typed config; presets by name; parameter counts.

Architecture only. How a routing method is trained (aux-loss coefficient, ReMoE's lambda0/alpha, TopK
warm-up) belongs to the method object (routing.py); the schedule and optimiser to the training config.
Backbone (the paper's, Sec. 4 / Table 1): LLaMA with RoPE base 1e6, grouped-query attention, SwiGLU FFN
with ffn_hidden = 4 x d_model, untied embeddings, no biases. The presets' numbers live in
conf/size/<name>.yaml (`arch:`), the one place they are written; `presets.preset()` reads them from there.
This module and the model modules it imports need only torch and numpy: export.py copies them beside a
Hugging Face model (modeling_remoe.py), so an exported model runs this very code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

DENSE = "dense"  # the routing of a model without experts (routing.Dense)


class ConfigFieldError(ValueError):
    """A bad architecture value; `.field` names the ModelConfig field, so callers can name their own key."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field, self.msg = field, msg


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    n_kv_head: int = 4  # GQA query groups ("num_groups" in Table 1)
    ffn_hidden: int | None = None  # one SwiGLU branch; default 4 * d_model
    ffn_mult: int = 1  # "Dense xM": the dense FFN is ffn_mult times wider
    vocab_size: int = 50257
    vocab_multiple: int = 1024  # vocabulary padded to a multiple of this (GPT-2: 50257 -> 51200)
    max_seq_len: int = 1024
    rope_base: float = 1e6
    norm_eps: float = 1e-5
    init_std: float = 0.01
    # The official (Megatron) code's output-layer init: every block's output projections -- attention's wo
    # and each FFN's / expert's W2 -- at init_std / sqrt(2 n_layer), the rest at init_std. False: every
    # weight at init_std (the paper's one sentence; this code's init before the powered study).
    scaled_output_init: bool = True
    # The FFN: DENSE (one FFN per block, no router) or the name of a routing method (routing.METHODS) whose
    # router feeds E*G experts
    routing: str = "dense"
    experts: int = 8
    topk: int = 1
    granularity: int = 1
    # Router options of single methods (each method lists the ones it reads in `arch_options` and checks their
    # values; any other method must leave them at their defaults). Names as in Hugging Face MoE configs.
    capacity_factor: float = 1.0  # ec: each expert takes capacity_factor * T * k / E tokens
    score_func: str = "sigmoid"  # auxfree: affinities by "sigmoid" (DeepSeek-V3) or "softmax"
    norm_topk_prob: bool | None = None  # auxfree: gates / their sum over the chosen k; None: on iff k*G > 1

    def __post_init__(self):
        """The backbone's checks, and those every MoE FFN shares; a routing method checks its own options
        (routing.method_of)."""
        def need(ok: bool, name: str, msg: str):
            if not ok:
                raise ConfigFieldError(name, f"{msg} (got {getattr(self, name)!r})")

        def positive_int(name: str):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, name, "must be a positive int")

        for name in ("n_layer", "d_model", "n_head", "n_kv_head", "vocab_size", "max_seq_len"):
            positive_int(name)
        need(self.d_model % self.n_head == 0, "n_head", f"must divide d_model={self.d_model}")
        need(self.n_head % self.n_kv_head == 0, "n_kv_head", f"must divide n_head={self.n_head}")
        need((self.d_model // self.n_head) % 2 == 0, "n_head", "head dim must be even for RoPE")
        need(isinstance(self.ffn_mult, int) and self.ffn_mult >= 1, "ffn_mult", "must be an int >= 1")
        need(isinstance(self.routing, str), "routing", "must be a routing method's name")
        if not self.is_moe:
            return
        need(self.ffn_mult == 1, "ffn_mult", "only the dense model can be widened")
        for name in ("experts", "topk", "granularity"):
            positive_int(name)
        need(self.topk <= self.experts, "topk", f"must be <= experts={self.experts}")
        need(self.ffn % self.granularity == 0, "granularity",
             f"must divide ffn_hidden={self.ffn} (each of E*G experts has ffn_hidden/G units)")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        """The FFN is routed over experts: any routing but DENSE (routing.RoutingMethod.moe says the same)."""
        return self.routing != DENSE

    @property
    def ffn(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def n_experts(self) -> int:
        """Fine-grained expert count E*G."""
        return self.experts * self.granularity

    @property
    def n_active(self) -> int:
        """Fine-grained active experts k*G (ReMoE: the target)."""
        return self.topk * self.granularity

    @property
    def expert_ffn(self) -> int:
        return self.ffn // self.granularity

    @property
    def normalizes_gates(self) -> bool:
        """auxfree: whether the chosen gates are divided by their sum (norm_topk_prob, None resolved)."""
        return self.n_active > 1 if self.norm_topk_prob is None else self.norm_topk_prob

    @property
    def target_sparsity(self) -> float:
        """1 - k/E: the share of zero gates at k of E experts per token (ReMoE's controller target)."""
        return 1.0 - self.n_active / self.n_experts

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """From to_dict() (a checkpoint's hyper_parameters["model"], an exported config's "remoe")."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)
