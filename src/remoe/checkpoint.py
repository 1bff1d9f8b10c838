"""Reading training checkpoints: one file (one device, DDP) or a sharded folder (trainer=fsdp: each rank
writes its shards with torch.distributed.checkpoint, rank 0 adds Lightning's meta.pt with the rest).

Evaluation, export and resume read either. A sharded folder's model weights are loaded alone (no optimizer
state, which is 3x the weights under AdamW) into a model built from the saved config, so reading one needs
the memory of the weights only, never the whole training state.
"""

from __future__ import annotations

import os

import torch

META = "meta.pt"  # Lightning's name for a sharded checkpoint's non-tensor part (lightning.fabric.utilities.load)


def is_sharded(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META))


def read_meta(path: str) -> dict:
    """Everything but weights and optimizer state is at least here (hyper_parameters, global_step, loops,
    callbacks, routing_state, tokenizer); a single-file checkpoint is returned whole (memory-mapped)."""
    if is_sharded(path):
        return torch.load(os.path.join(path, META), map_location="cpu", weights_only=True)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder without {META}: not a checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_state_dict(path: str, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's "state_dict" entries named in `template` (LightningModule keys, "model.<param>"),
    read into tensors shaped like the template's."""
    if not is_sharded(path):
        return read_meta(path)["state_dict"]
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    state = {"state_dict": {k: torch.empty_like(v) for k, v in template.items()}}
    dcp_load(state, storage_reader=FileSystemReader(path), no_dist=True)
    return state["state_dict"]
