"""FSDP2 for trainer=fsdp: Lightning's ModelParallelStrategy (the model is sharded by LitLM.configure_model)
with sharded checkpoints that are replaced atomically.

Why: a sharded checkpoint is a folder that every rank writes its shards into, and rank 0 then meta.pt; a
job killed while it is being overwritten would leave new shards beside old metadata. Here each save goes to
a new folder, `last.ckpt.step<N>`, and `last.ckpt` is a symbolic link switched to it in one rename (then the
previous folder is removed): at any instant `last.ckpt` is one whole checkpoint, as a single-file checkpoint
is. Readers (resume, evaluate, export) follow the link. Loading goes through remoe.checkpoint's readers, which
run no code from the folder (Lightning's own reads its `.metadata` with pickle and the optimizer's non-tensor
items with weights_only=False).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from ..checkpoint import META, dcp_load, is_sharded


class FSDP2Strategy(ModelParallelStrategy):
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        link = Path(self.broadcast(str(filepath)))
        target = link.with_name(f"{link.name}.step{checkpoint.get('global_step', 0)}")
        if self.global_rank == 0 and target.exists() and not _points_to(link, target):
            shutil.rmtree(target)  # a leftover of a killed save (never the folder last.ckpt points to)
        self.barrier()
        if _points_to(link, target):  # saved twice at one step (e.g. the fault handler after the periodic save)
            return
        super().save_checkpoint(checkpoint, target, storage_options)
        self.barrier()
        if self.global_rank == 0:
            previous = link.resolve() if link.is_symlink() else None
            tmp = link.with_name(link.name + ".link")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            tmp.symlink_to(target.name)
            if link.exists() and not link.is_symlink():  # a real folder/file from before: keep it aside
                os.replace(link, link.with_name(link.name + ".replaced"))
            os.replace(tmp, link)  # the switch: atomic
            if previous is not None and previous != target.resolve() and previous.exists():
                shutil.rmtree(previous)
        self.barrier()


    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Lightning's sharded load (model, then each optimizer, then meta.pt), through remoe.checkpoint."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = str(self.broadcast(str(checkpoint_path)))
        if not is_sharded(path):
            return super().load_checkpoint(checkpoint_path, weights_only=True)
        module = self.model
        state = {"state_dict": get_model_state_dict(module)}
        dcp_load(state, path)
        module.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"  # as ModelParallelStrategy.save_checkpoint names them
            state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp_load(state, path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(os.path.join(path, META), map_location="cpu", weights_only=True)


def _points_to(link: Path, target: Path) -> bool:
    return link.is_symlink() and link.resolve() == target.resolve()
