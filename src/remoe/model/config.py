"""One typed config per model, presets by name, parameter counts from the config alone.

Follows ../shared/spec/METHOD.md: LLaMA backbone (RoPE base 1e6, 4 GQA groups, SwiGLU with
ffn_hidden = 4 x hidden, untied embeddings, no biases) and the paper's Table 1 presets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

ROUTERS = (None, "topk", "relu")
REGULARIZERS = ("lb_l1", "l1")
# model name used in configs/reports -> router
VARIANTS = {"dense": None, "topk": "topk", "remoe": "relu"}


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
    # MoE: router None = dense FFN; "topk" = softmax-then-top-k; "relu" = ReMoE
    router: str | None = None
    experts: int = 8
    topk: int = 1
    granularity: int = 1
    aux_loss_coef: float = 1e-2  # TopK Switch load-balancing loss coefficient
    regularizer: str = "lb_l1"  # ReMoE: load-balancing refined L1, or plain "l1"
    lambda0: float = 1e-8  # ReMoE adaptive coefficient: initial value
    alpha: float = 1.2  # ... and multiplicative step
    warmup_topk: int | None = None  # TopK "near-dense warm-up": this k for the first warmup_steps steps
    warmup_steps: int = 0

    def __post_init__(self):
        def need(ok: bool, name: str, msg: str):
            if not ok:
                raise ValueError(f"{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("n_layer", "d_model", "n_head", "n_kv_head", "vocab_size", "max_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        need(self.d_model % self.n_head == 0, "n_head", f"must divide d_model={self.d_model}")
        need(self.n_head % self.n_kv_head == 0, "n_kv_head", f"must divide n_head={self.n_head}")
        need((self.d_model // self.n_head) % 2 == 0, "n_head", "head dim must be even for RoPE")
        need(self.ffn_mult >= 1, "ffn_mult", "must be >= 1")
        need(self.router in ROUTERS, "router", f"unknown router; choose one of {ROUTERS}")
        if self.router is None:
            return
        need(self.ffn_mult == 1, "ffn_mult", "only the dense model can be widened")
        need(isinstance(self.experts, int) and self.experts > 0, "experts", "must be a positive int")
        need(isinstance(self.topk, int) and self.topk > 0, "topk", "must be a positive int")
        need(self.topk <= self.experts, "topk", f"must be <= experts={self.experts}")
        need(isinstance(self.granularity, int) and self.granularity > 0, "granularity", "must be a positive int")
        need(
            self.ffn % self.granularity == 0,
            "granularity",
            f"must divide ffn_hidden={self.ffn} (each of E*G experts has ffn_hidden/G units)",
        )
        need(self.regularizer in REGULARIZERS, "regularizer", f"choose one of {REGULARIZERS}")
        need(self.lambda0 > 0, "lambda0", "must be > 0")
        if self.warmup_topk is not None:
            need(self.router == "topk", "warmup_topk", "near-dense warm-up is for the topk router")
            need(self.topk <= self.warmup_topk <= self.experts, "warmup_topk", f"must be in [topk, experts={self.experts}]")
        need(self.alpha > 1, "alpha", "must be > 1")

    # ---- derived sizes -------------------------------------------------------------------
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
    def is_moe(self) -> bool:
        return self.router is not None

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
    def target_sparsity(self) -> float:
        return 1.0 - self.n_active / self.n_experts

    # ---- parameter counts ----------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts of `Transformer(self)`; tested against the module."""
        d, V = self.d_model, self.padded_vocab_size
        embed = 2 * V * d  # untied input embedding and output head
        kv = self.n_kv_head * self.head_dim
        attn = 2 * d * d + 2 * d * kv  # wq, wo ; wk, wv
        norms = 2 * d
        if self.is_moe:
            expert = 3 * d * self.expert_ffn
            router = d * self.n_experts
            ffn_total = self.n_experts * expert + router
            ffn_active = self.n_active * expert + router
        else:
            ffn_total = ffn_active = 3 * d * self.ffn * self.ffn_mult
        L = self.n_layer
        total = embed + L * (attn + norms + ffn_total) + d
        active = embed + L * (attn + norms + ffn_active) + d
        return {"total": total, "active": active, "embedding": embed, "non_embedding_active": active - embed}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def with_(self, **kw) -> ModelConfig:
        return replace(self, **kw)


# Paper presets (Table 1) and CPU presets. Vocabulary is set by the tokenizer at build time.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=128, vocab_multiple=64),
    "small": dict(n_layer=4, d_model=256, n_head=8, n_kv_head=4, max_seq_len=256, vocab_multiple=64),
    "182m": dict(n_layer=12, d_model=768, n_head=12, n_kv_head=4),
    "469m": dict(n_layer=24, d_model=1024, n_head=16, n_kv_head=4),
    "978m": dict(n_layer=24, d_model=1536, n_head=16, n_kv_head=4),
}


def preset(name: str, variant: str = "dense", **overrides) -> ModelConfig:
    """`preset("182m", "remoe", experts=8)` -> ModelConfig."""
    if name not in PRESETS:
        raise ValueError(f"size: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if variant not in VARIANTS:
        raise ValueError(f"model: unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return ModelConfig(**{**PRESETS[name], "router": VARIANTS[variant], **overrides})
