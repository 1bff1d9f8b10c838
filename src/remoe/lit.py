"""The LightningModule for all three variants: loss assembly, the once-per-optimizer-step lambda update,
and per-step logging. It knows nothing of Hydra: it takes plain dicts (checkpoint-safe hyperparameters).

loss = L_lm                          (dense)
     = L_lm + aux_coef * L_aux      (TopK; L_aux summed over layers)
     = L_lm + lambda_i * L_reg      (ReMoE; L_reg averaged over layers, lambda_i from the controller)
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F

from .callbacks import NonFiniteError
from .model import LambdaController, ModelConfig, Transformer, layer_sparsity


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """lr multiplier: linear warm-up to 1, then cosine down to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LitLM(L.LightningModule):
    def __init__(self, model: dict, optim: dict, routing_log_interval: int = 50):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = ModelConfig.from_dict(dict(model))
        self.model = Transformer(self.cfg)
        self.optim = dict(optim)
        self.routing_log_interval = routing_log_interval
        self.controller = (
            LambdaController(self.cfg.target_sparsity, self.cfg.lambda0, self.cfg.alpha)
            if self.cfg.router == "relu" else None
        )
        self.last_routing: dict | None = None  # this step's reduced counts, for callbacks
        self._step_t0: float | None = None
        self.tokens_per_step = 0  # global tokens in the current optimizer step, counted from the batches
        self.train_tokens, self.train_time = 0, 0.0  # totals over optimizer steps (validation excluded)
        self.sparsity_history: list[float] = []  # one per optimizer step since history_start
        self.history_start = 0
        self.rank_states: dict | None = None
        self.tokenizer_json: str | None = None  # set by the pipeline: checkpoints are self-contained

    def forward(self, idx: torch.Tensor):
        return self.model(idx)

    def _lm_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        out = self.model(ids[:, :-1])
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        return lm, out.router_loss, ids[:, :-1].numel()

    def on_train_start(self) -> None:
        self.history_start = self.trainer.global_step  # > 0 when resumed

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.cfg.warmup_topk is not None:  # TopK near-dense warm-up, then the target k
            warm = self.trainer.global_step < self.cfg.warmup_steps
            self.model.set_topk(self.cfg.warmup_topk if warm else self.cfg.topk)

    def training_step(self, batch, batch_idx):
        if self._step_t0 is None:
            self._step_t0 = time.perf_counter()
        lm, router_loss, n_tok = self._lm_loss(batch)
        self.tokens_per_step += n_tok * self.trainer.world_size
        if self.cfg.router == "topk":
            coef = self.cfg.aux_loss_coef
        elif self.cfg.router == "relu":
            coef = self.controller.value
        else:
            coef = 0.0
        weighted = coef * router_loss
        loss = lm + weighted
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite loss at step {self.trainer.global_step}: lm={lm.item()}, "
                                 f"router={router_loss.item()}, coef={coef}")
        log = dict(on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log("train/lm_loss", lm, **log)
        if self.cfg.is_moe:
            name = "aux_loss" if self.cfg.router == "topk" else "reg_loss"
            self.log(f"train/{name}", router_loss, **log)
            self.log(f"train/weighted_{name}", weighted, **log)  # lambda * L_reg for ReMoE
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if not torch.isfinite(norm):
                raise NonFiniteError(f"non-finite gradient norm at step {self.trainer.global_step}")
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def optimizer_step(self, *args, **kwargs):
        """After the step's last forward: reduce routing counts over ranks, update lambda once, log."""
        super().optimizer_step(*args, **kwargs)
        now = time.perf_counter()
        if self._step_t0 is not None and now > self._step_t0:
            self.log("train/tokens_per_s", self.tokens_per_step / (now - self._step_t0), on_step=True)
            self.train_tokens += self.tokens_per_step
            self.train_time += now - self._step_t0
        self._step_t0, self.tokens_per_step = now, 0
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        if not self.cfg.is_moe:
            return
        counts, tokens = self.model.routing_counts()
        counts = self.trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        tokens = self.trainer.strategy.reduce(tokens.clone(), reduce_op="sum")
        self.model.reset_routing_counts()
        per_layer = layer_sparsity(counts, tokens)
        sparsity = per_layer.mean().item()
        self.sparsity_history.append(sparsity)
        self.log("train/sparsity", sparsity, on_step=True, prog_bar=self.cfg.router == "relu")
        for i, s in enumerate(per_layer.tolist()):
            self.log(f"sparsity/layer_{i}", s, on_step=True)
        self.log("train/experts_per_token", (counts.sum(-1) / tokens.clamp_min(1)).float().mean(), on_step=True)
        if self.controller is not None:
            self.log("train/lambda", self.controller.value, on_step=True)  # lambda_i used in this step
            self.controller.update(sparsity)
        step = self.trainer.global_step
        self.last_routing = {"step": step, "counts": counts.cpu(), "tokens": tokens.cpu(), "sparsity": sparsity}
        if self.routing_log_interval and step % self.routing_log_interval == 0:
            share = counts.double() / counts.sum(-1, keepdim=True).clamp_min(1)
            for li, row in enumerate(share.tolist()):
                for e, v in enumerate(row):
                    self.log(f"routing/l{li}_e{e}", v, on_step=True)

    def on_train_end(self) -> None:
        """Every rank's lambda and last sparsity, gathered: they must agree (one controller, reduced counts)."""
        if self.controller is None or not self.sparsity_history:
            return
        state = torch.tensor([self.controller.value, self.sparsity_history[-1]], dtype=torch.float64,
                             device=self.device)
        gathered = self.all_gather(state).reshape(-1, 2).cpu()
        self.rank_states = {"lambda": gathered[:, 0].tolist(), "sparsity": gathered[:, 1].tolist()}
        if not (gathered == gathered[0]).all():
            raise RuntimeError(f"lambda/sparsity differ across data-parallel ranks: {self.rank_states}")

    def on_validation_end(self) -> None:
        self._step_t0 = None  # the next step's timer starts at its first micro-batch

    def validation_step(self, batch, batch_idx):
        lm, _, _ = self._lm_loss(batch)
        self.log("val/loss", lm, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True,
                 batch_size=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss.float()), sync_dist=False)

    def configure_optimizers(self):
        o = self.optim
        decay = [p for p in self.parameters() if p.ndim >= 2]  # no weight decay on norms
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
        )
        total = self.trainer.max_steps
        warmup = max(1, round(o["warmup"] * total) if o["warmup"] < 1 else int(o["warmup"]))
        min_ratio = o["min_lr"] / o["lr"]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_with_warmup(s, warmup, total, min_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # lambda and the controller state travel in the checkpoint, as plain floats
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer_json is not None:
            checkpoint["tokenizer"] = self.tokenizer_json
        if self.controller is not None:
            checkpoint["lambda_controller"] = self.controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.controller is not None and "lambda_controller" in checkpoint:
            self.controller.load_state_dict(checkpoint["lambda_controller"])
