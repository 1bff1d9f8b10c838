"""The LightningModule for every routing method: the training step, the once-per-optimizer-step routing
update, and the per-step logs. What differs between methods is the routing method object's
(model/routing.py); nothing here compares a method's name. It knows nothing of Hydra: it takes plain
dicts (checkpoint-safe hyperparameters).

loss = L_lm + method.weighted_loss(out)[1]   (= coefficient() * loss(out) unless layers are weighted apart)
  dense: 0;  TopK: aux_coef * Switch aux loss summed over layers;  ReMoE: lambda_i * L_reg (layer mean)
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from .callbacks import NonFiniteError
from .checkpoint import FORMAT, FORMAT_KEY
from .model import ModelConfig, RoutingStats, Transformer, build_method
from .model.experts import GroupedExperts, SwiGLU
from .model.stats import expert_share
from .runs import RECIPE


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


def compile_blocks(model: Transformer) -> None:
    """torch.compile each transformer block in place (nn.Module.compile: parameter names, hence checkpoints and
    exports, unchanged), as torchtitan compiles per block. An MoE block's dispatch and expert stage run eager
    (torch.compiler.disable: host-side capacity choices, and _grouped_mm's fake-tensor rule): dynamo compiles
    attention, norms and the router around them."""
    for block in model.blocks:
        block.compile()


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


class LitLM(L.LightningModule):
    """Public state for callbacks and the pipeline: `model`, `routing` (the method object),
    `last_routing` (the latest optimizer step's RoutingStats) and `rank_states` (after training)."""

    def __init__(self, model: ModelConfig | dict, optim: dict, routing: dict | None = None,
                 routing_log_interval: int = 50, tokenizer_json: str | None = None):
        super().__init__()
        self.cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
        # plain containers only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"model": self.cfg.to_dict(), "optim": dict(optim), "routing": routing,
                                   "routing_log_interval": routing_log_interval})
        self.model = Transformer(self.cfg)
        self.routing = build_method(self.cfg, **(routing or {}))
        self.optim = dict(optim)
        self.routing_log_interval = routing_log_interval
        self.tokenizer_json = tokenizer_json  # goes into every checkpoint: checkpoints are self-contained
        self.last_routing: RoutingStats | None = None
        # this step's gradient norm and the parameters it was taken over (on_before_optimizer_step): clipping
        # scales exactly those gradients by exactly that norm
        self._grad_norm: torch.Tensor | None = None
        self._clip_params: list[torch.nn.Parameter] = []
        self.rank_states: dict | None = None

    def forward(self, idx: torch.Tensor):
        return self.model(idx)

    def configure_model(self) -> None:
        """trainer=fsdp (Lightning's ModelParallelStrategy): FSDP2 (fully_shard) per transformer block, then
        the root (embedding, final norm, head), over the data-parallel mesh, as torchtitan does. Parameters,
        gradients and AdamW state are sharded along dim 0 (an expert weight (E, d, f): by expert); a block's
        weights are gathered for its forward and backward only. Buffers (routing counts, the hash table, the
        expert bias) stay whole on every rank, and the routing counts are all-reduced as under DDP."""
        mesh = self._device_mesh
        if mesh is None or self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() != 1:
            raise ValueError("trainer.strategy: tensor parallelism is not implemented; set tensor_parallel_size=1")
        for block in self.model.blocks:
            fully_shard(block, mesh=dp)
        fully_shard(self.model, mesh=dp)

    @property
    def sharded(self) -> bool:
        """Whether configure_model sharded the model (fully_shard makes it an FSDPModule)."""
        if not torch.distributed.is_available():  # a torch built without distributed cannot shard
            return False
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.model, FSDPModule)

    def _losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_lm, the routing loss, its weighted term added to L_lm)."""
        ids = batch["input_ids"]
        out = self.model(ids[:, :-1])
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        return lm, *self.routing.weighted_loss(out)

    def on_train_start(self) -> None:
        # the checkpoint restored the history; one from before it was checkpointed did not
        self.routing.history_start = self.trainer.global_step - len(self.routing.sparsity_history)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.routing.on_train_step_start(self.trainer.global_step, self.model)

    def whole_model(self) -> Transformer | None:
        """The trained model, whole, for rank-0 work after training (routing analysis, evaluation). Sharded
        (FSDP2): every rank must call this (it gathers the full state dict, a collective); rank 0 gets an
        unsharded copy on CPU, the others None. Otherwise: self.model on every rank."""
        if not self.sharded:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank != 0:
            return None
        whole = Transformer(self.cfg)
        whole.load_state_dict(state, strict=True)
        return whole.train(self.model.training)

    def training_step(self, batch, batch_idx):
        lm, routing_loss, weighted = self._losses(batch)
        loss = lm + weighted
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite loss at step {self.trainer.global_step}: lm={lm.item()}, "
                                 f"routing={routing_loss.item()}, coef={self.routing.coefficient()}")
        log = dict(on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log("train/lm_loss", lm, **log)
        if self.routing.loss_name:
            self.log(f"train/{self.routing.loss_name}", routing_loss, **log)
            self.log(f"train/weighted_{self.routing.loss_name}", weighted, **log)  # e.g. lambda * L_reg
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # torch's get_total_norm (what clip_grad_norm_ uses): one foreach pass, no host sync per parameter
        # (Lightning's utilities.grad_norm builds a per-parameter dict and syncs on each one)
        self._clip_params = [p for p in self.parameters() if p.grad is not None]
        grads = [p.grad for p in self._clip_params]
        self._grad_norm = None
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor of sharded partial norms -> the global norm
                norm = norm.full_tensor()
            if not torch.isfinite(norm):
                raise NonFiniteError(f"non-finite gradient norm at step {self.trainer.global_step}")
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            self._grad_norm = norm

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the norm just logged (one norm pass, not two): the global norm on one device, under DDP and
        under FSDP2 (whose sharded partial norms full_tensor() combined), without an fp16 loss scaler. Also why
        a fused AdamW can clip here: Lightning's mixed-precision plugin refuses clipping with any fused
        optimizer, a guard that matters only for a GradScaler (bf16-mixed has none). Else Lightning clips."""
        from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

        whole = isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy))
        if (gradient_clip_val and gradient_clip_algorithm in (None, "norm") and whole and self._grad_norm is not None
                and getattr(self.trainer.precision_plugin, "scaler", None) is None):
            torch.nn.utils.clip_grads_with_norm_(self._clip_params, gradient_clip_val, self._grad_norm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs):
        """After the step: reduce the routing counts over ranks and hand them to the routing method (its
        controller updates once per optimizer step, on the same numbers on every rank)."""
        super().optimizer_step(*args, **kwargs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        if not self.routing.moe:
            return
        counts, tokens = self.model.routing_counts()
        counts = self.trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        tokens = self.trainer.strategy.reduce(tokens.clone(), reduce_op="sum")
        self.model.reset_routing_counts()
        stats = RoutingStats(self.trainer.global_step, counts.cpu().numpy(), tokens.cpu().numpy())
        self.last_routing = stats
        bar = set(self.routing.progress_bar)
        logs = {"train/sparsity": stats.sparsity, "train/experts_per_token": stats.experts_per_token,
                "train/max_violation": stats.max_violation,
                **{f"sparsity/layer_{i}": s for i, s in enumerate(stats.layer_sparsity.tolist())},
                **self.routing.on_optimizer_step(stats, self.model)}
        if any(m.capacity is not None for m in self.model.moe_layers()):  # bounded dispatch (moe_dispatch)
            logs["train/pair_overflows"] = float(self.model.pair_overflows)  # forwards re-run exactly so far
        for name, value in logs.items():
            self.log(name, value, on_step=True, prog_bar=name in bar)
        if self.routing_log_interval and stats.step % self.routing_log_interval == 0:
            # straight to the loggers: values given to self.log in this hook are re-logged at every later
            # step until logged again, which showed one step's expert shares as 50 steps of data
            shares = {f"routing/l{li}_e{e}": v for li, row in enumerate(expert_share(stats.counts).tolist())
                      for e, v in enumerate(row)}
            for lg in self.loggers:
                lg.log_metrics(shares, step=stats.step)

    def on_train_end(self) -> None:
        """The routing method's state on every rank, gathered: it must agree (one controller, reduced
        counts)."""
        state = self.routing.rank_state()
        if state is None:
            return
        mine = torch.tensor(list(state.values()), dtype=torch.float64, device=self.device)
        gathered = self.all_gather(mine).reshape(-1, len(state)).cpu()
        self.rank_states = {k: gathered[:, i].tolist() for i, k in enumerate(state)}
        if not (gathered == gathered[0]).all():
            raise RuntimeError(f"routing state differs across data-parallel ranks: {self.rank_states}")

    def validation_step(self, batch, batch_idx):
        lm = self._losses(batch)[0]
        self.log("val/loss", lm, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True,
                 batch_size=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss.float()), sync_dist=False)

    def configure_optimizers(self):
        optim = dict(self.optim)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None and optim.get("fused") == "auto":
            optim["fused"] = False  # fp16 loss scaling: Lightning unscales before clipping only unfused optimizers
        opt, sched = build_optimizer(self, optim, self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # the routing method's state (ReMoE: lambda and its controller) travels in the checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer_json is not None:
            checkpoint["tokenizer"] = self.tokenizer_json
        checkpoint["routing_state"] = self.routing.state_dict()
        checkpoint[FORMAT_KEY] = FORMAT

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.routing.load_state_dict(checkpoint["routing_state"])  # format checked before (checkpoint.check_format)
