"""The LightningModule for every routing method: the training step, the once-per-optimizer-step routing
update, and the per-step logs. What differs between methods is the routing method object's
(model/routing.py); nothing here compares a method's name. It knows nothing of Hydra: it takes plain
dicts (checkpoint-safe hyperparameters).

loss = L_lm + method.weighted_loss(out)[1]   (= coefficient() * loss(out) unless layers are weighted apart)
  dense: 0;  TopK: aux_coef * Switch aux loss summed over layers;  ReMoE: lambda_i * L_reg (layer mean)
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..checkpoint import FORMAT, FORMAT_KEY
from ..model import ModelConfig, RoutingMethod, RoutingStats, Transformer, build_method
from ..model.stats import expert_share
from .callbacks import NonFiniteError
from .optim import build_optimizer


def compile_blocks(model: Transformer) -> None:
    """torch.compile each transformer block in place (nn.Module.compile: parameter names, hence checkpoints and
    exports, unchanged), as torchtitan compiles per block. An MoE block's dispatch and expert stage run eager
    (torch.compiler.disable: host-side capacity choices, and _grouped_mm's fake-tensor rule): dynamo compiles
    attention, norms and the router around them."""
    for block in model.blocks:
        block.compile()


class LitLM(L.LightningModule):
    """Public state for callbacks and the pipeline: `model`, `routing` (the method object),
    `last_routing` (the latest optimizer step's RoutingStats) and `rank_states` (after training)."""

    def __init__(self, model: ModelConfig | dict, optim: dict, routing: dict | None = None,
                 routing_log_interval: int = 50, tokenizer_json: str | None = None,
                 method: RoutingMethod | None = None):
        """routing: the method's knobs (plain values, saved as hyperparameters); method: the method object already
        built from them (the run's RunSpec; its architecture may lack only the vocabulary), else built here."""
        super().__init__()
        self.cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
        # plain containers only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"model": self.cfg.to_dict(), "optim": dict(optim), "routing": routing,
                                   "routing_log_interval": routing_log_interval})
        self.model = Transformer(self.cfg)
        if method is None:
            method = build_method(self.cfg, **(routing or {}))
        elif method.knobs != method.Knobs(**(routing or {})):
            raise ValueError(f"the routing method object has knobs {method.knobs}, the hyperparameters {routing}")
        self.routing = method.rebind(self.cfg)
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
