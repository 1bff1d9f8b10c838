"""The optimizer recipe: AdamW with no weight decay on norms, linear warm-up then cosine decay to min_lr (the
paper's), and the two options that move single weights off its one LR (neither is the paper's)."""

from __future__ import annotations

import math

import torch

from ..model.experts import GroupedExperts, SwiGLU

# The paper's optimizer recipe: the `optim` options that move weights off its one LR (lr_multiples),
# at the values that keep it. A record written before an option existed trained at this value; a run off it
# is a study of its own (the report labels it, remoe.report.tables.variant); a resume may not change it
# (the optimizer's parameter groups would differ from the checkpoint's).
RECIPE = {"router_lr_scale": 1.0, "ffn_down_lr": "same"}
FFN_DOWN_LR = ("same", "fan_in")  # optim.ffn_down_lr: the paper's one LR | the muP rule on each FFN's W2


def lr_multiples(model: torch.nn.Module, o: dict) -> dict[int, tuple[torch.nn.Parameter, float]]:
    """The weights that optim options move off the one LR, {id: (weight, multiple of lr)}; empty for the
    paper's recipe. Options (neither is the paper's):
    - router_lr_scale (issue 12): every router's weight at that multiple.
    - ffn_down_lr=fan_in (issue 20): each FFN's down-projection W2 (the dense FFN's and every expert's) at
      lr * 4 d_model / its fan-in (the FFN's hidden width): muP's Adam LR for a hidden matrix, proportional to
      1/fan-in (Yang et al. 2022, Tensor Programs V), anchored at the paper's 4 d_model FFN, whose W2 keeps
      lr. Why: under one LR an 8x wider FFN's W2 moves its output ~8x as far per step; Dense x8 (lr/8)
      and G=2 experts (2 lr) are the weights it changes; Dense and G=1 experts train exactly as without it."""
    scale = float(o.get("router_lr_scale", RECIPE["router_lr_scale"]))
    if not scale > 0:
        raise ValueError(f"optim.router_lr_scale={scale}: must be > 0")
    rule = o.get("ffn_down_lr", RECIPE["ffn_down_lr"])
    if rule not in FFN_DOWN_LR:
        raise ValueError(f"optim.ffn_down_lr={rule!r}: must be one of {FFN_DOWN_LR}")
    out = {}
    if scale != 1:
        for layer in (model.moe_layers() if hasattr(model, "moe_layers") else []):
            out.update({id(p): (p, scale) for p in layer.router.parameters()})
    if rule == "fan_in":
        base = 4 * model.cfg.d_model
        for m in model.modules():
            if isinstance(m, (SwiGLU, GroupedExperts)) and m.ffn != base:
                w = getattr(m.w2, "weight", m.w2)  # SwiGLU: nn.Linear; experts: the (E, ffn, d) parameter
                out[id(w)] = (w, base / m.ffn)
    return out


def build_optimizer(module: torch.nn.Module, o: dict, total: int):
    """(AdamW, its LambdaLR schedule) for `module` under the `optim` settings: no weight decay on norms
    (1-d parameters); linear warm-up then cosine to min_lr over `total` steps. Weights that an option moves
    off the one LR (lr_multiples) get one group per multiple, with weight decay, on the same schedule; under
    the paper's recipe the groups are exactly the paper-exact two."""
    model = getattr(module, "model", module)
    moved = lr_multiples(model, o)
    decay = [p for p in module.parameters() if p.ndim >= 2 and id(p) not in moved]
    no_decay = [p for p in module.parameters() if p.ndim < 2 and id(p) not in moved]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    for mult in sorted({m for _, m in moved.values()}):
        groups.append({"params": [p for p, m in moved.values() if m == mult], "lr": o["lr"] * mult,
                       "weight_decay": o["weight_decay"]})
    every = decay + no_decay + [p for p, _ in moved.values()]
    opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                            **adamw_impl(o.get("fused", "auto"), every))
    warmup = max(1, round(o["warmup"] * total) if o["warmup"] < 1 else int(o["warmup"]))
    min_ratio = o["min_lr"] / o["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, warmup, total, min_ratio))
    return opt, sched


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """lr multiplier: linear warm-up to 1, then cosine down to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_impl(fused: bool | str, params: list[torch.Tensor]) -> dict:
    """AdamW's implementation: fused (one kernel over all parameters) where torch has it for every parameter's
    device, else torch's default. Why: on CPU the default (foreach) step of size=small TopK E=8 took 33 ms, the
    fused one 12 ms (bench.py step). Same update rule; the rounding of the update may differ in the last bit.
    fused: "auto" (fused where supported), True (required), False (torch's default)."""
    supported = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    if fused == "auto":
        return {"fused": True} if supported and params else {}
    if fused and not supported:
        raise ValueError("optim.fused=true: fused AdamW needs every parameter on cpu or cuda")
    return {"fused": True} if fused else {}
