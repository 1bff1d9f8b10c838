"""Reading and writing training checkpoints: one file (one device, DDP) or a sharded folder (trainer=fsdp:
each rank writes its shards with torch.distributed.checkpoint, rank 0 adds Lightning's meta.pt with the rest).

Evaluation, export and resume read either. A sharded folder's model weights are loaded alone (no optimizer
state, which is 3x the weights under AdamW) into a model built from the saved config, so reading one needs
the memory of the weights only, never the whole training state.

No file read here can run code (a checkpoint is a file someone may hand you):
- single files and meta.pt: torch.load(weights_only=True) (torch's restricted unpickler: tensors and plain
  containers only);
- a sharded folder's `.metadata`, which torch.distributed.checkpoint's FileSystemReader reads with plain
  pickle: read here by an unpickler that only knows the checkpoint-metadata classes (SafeReader); any other
  global is refused before anything is built;
- its `.distcp` shards: tensors through torch.load(weights_only=True) (torch's own reader), and the non-tensor
  items (the optimizer's param_groups), which the default planner unpickles with weights_only=False, also
  with weights_only=True (SafePlanner); shard paths must lie inside the folder.

Writing (AtomicCheckpointIO): a checkpoint file is written beside its target and renamed over it in the same
folder, so at every instant `last.ckpt` is a whole checkpoint. Lightning's own save writes to $TMPDIR and,
when that is another file system, copies over the target in place (truncate, then write): a kill or a full
disk during that copy leaves no loadable checkpoint.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import pickle
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .cli import UsageError, first_line
from .io import remove_leftovers
from .model import ModelConfig, Transformer, param_counts

META = "meta.pt"  # Lightning's name for a sharded checkpoint's non-tensor part (lightning.fabric.utilities.load)
# The layout of what training adds to a checkpoint (hyper_parameters model/optim/routing, routing_state,
# tokenizer). 1: the routing-method objects (commit 0290963 on); a checkpoint without the key is format 1 when
# its model config names a routing method. Format 0 (commit a7cf893 and earlier: `router` in the model config,
# knobs inside it, the controller at the top level) is refused in one line.
FORMAT, FORMAT_KEY = 1, "remoe_format"


def check_format(ckpt: dict, path: str) -> None:
    """CheckpointError (one line, exit 2) unless `ckpt` (read_meta's dict) is in this code's format."""
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    model = hp.get("model") if isinstance(hp, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"checkpoint: {path!r} is not a remoe checkpoint (no model config inside)")
    fmt = ckpt.get(FORMAT_KEY, 0 if "router" in model else 1)
    if fmt != FORMAT:
        older = isinstance(fmt, int) and fmt < FORMAT
        raise CheckpointError(
            f"checkpoint: {path!r} is in remoe checkpoint format {fmt!r}, this code reads format {FORMAT}"
            + (" (format 0 was written before the routing-method objects, commit a7cf893 and earlier: load it "
               "with that code)" if older else " (written by newer code)"))


class CheckpointError(UsageError):
    """A checkpoint (or exported folder) that cannot be read: one line naming it (entry scripts: exit 2)."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint that would need code run to read it, or that points outside itself."""


def run_dir_of(checkpoint: str) -> str | None:
    """The run folder a training checkpoint belongs to (<run>/checkpoints/<file or sharded folder>), or None
    for a checkpoint kept anywhere else. Symbolic links resolved."""
    parent = os.path.dirname(os.path.realpath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def overlaps(a: str, b: str) -> bool:
    """Whether one of two paths is the other or lies inside it (real paths: links resolved)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


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


def stored_shapes(path: str, ckpt: dict) -> dict[str, tuple[int, ...]]:
    """The shapes of a checkpoint's model tensors ("model.*" keys of its state_dict), read without loading
    them (a file's are memory-mapped; a sharded folder's come from its metadata)."""
    if is_sharded(path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = read_sharded_metadata(path)
        return {k.removeprefix("state_dict."): tuple(v.size) for k, v in md.state_dict_metadata.items()
                if k.startswith("state_dict.model.") and isinstance(v, TensorStorageMetadata)}
    return {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()
            if k.startswith("model.") and isinstance(v, torch.Tensor)}


def check_shapes(cfg, stored: dict[str, tuple[int, ...]]) -> None:
    """ValueError unless a model of `cfg` has exactly the stored tensors. The config's parameter count
    (arithmetic) is checked against the stored numbers first, so no config larger than the file is ever
    built; then the model is built on the meta device (no memory) and its state dict compared."""
    described = param_counts(cfg)["total"]
    if described > sum(math.prod(s) for s in stored.values()):
        raise ValueError(f"its config describes {described:,} parameters, it stores fewer")
    with torch.device("meta"):
        want = {f"model.{k}": tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if want != stored:
        diff = sorted(set(want) ^ set(stored)) or [k for k in want if want[k] != stored[k]]
        raise ValueError(f"its weights do not match its config (first difference: {diff[0]})")


def open_checkpoint(path: str) -> dict:
    """read_meta, with every way it can fail a CheckpointError naming the file (one line, exit 2)."""
    try:
        return read_meta(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: no such file {path!r}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint: {path!r} is a folder, not a checkpoint file") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint: cannot read {path!r} (truncated, not a torch checkpoint, or it holds "
                              f"more than tensors and plain values: {type(e).__name__})") from None


# ---- sharded folders: torch.distributed.checkpoint without pickle --------------------------------------
def _allowed_globals() -> dict[tuple[str, str], object]:
    """What a `.metadata` written by torch.distributed.checkpoint refers to: its dataclasses, torch dtypes,
    sizes and layouts, and a path (StorageMeta.checkpoint_id). Constructing any of them runs no user code."""

    from torch.distributed.checkpoint import filesystem, metadata

    out = {("torch.distributed.checkpoint.metadata", n): getattr(metadata, n)
           for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    out[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    out[("torch", "Size")] = torch.Size
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    out[("pathlib", "PosixPath")] = pathlib.PosixPath
    out[("pathlib", "WindowsPath")] = pathlib.PosixPath  # a path written on Windows, read as a plain path
    out[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name in dir(torch):  # dtypes are module attributes: torch.float32, torch.bfloat16, ...
        if isinstance(getattr(torch, name, None), torch.dtype):
            out[("torch", name)] = getattr(torch, name)
    return out


class _MetadataUnpickler(pickle.Unpickler):
    """pickle's "restricting globals" (Python docs, pickle): only the classes above can be named."""

    allowed: dict = {}

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpoint(f"refers to {module}.{name}, which a checkpoint's metadata never "
                                   "holds (a crafted file?); not read") from None


def read_sharded_metadata(path: str):
    """The `.metadata` of a sharded checkpoint folder, unpickled without running code; every shard it names
    lies inside the folder."""
    from torch.distributed.checkpoint.metadata import Metadata

    _MetadataUnpickler.allowed = _MetadataUnpickler.allowed or _allowed_globals()
    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = _MetadataUnpickler(f).load()
    if not isinstance(md, Metadata):
        raise UnsafeCheckpoint(f"{path}/.metadata holds a {type(md).__name__}, not checkpoint metadata")
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise UnsafeCheckpoint(f"{path}/.metadata names a shard outside the folder ({rel!r})")
    return md


def _safe_reader(path: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """FileSystemReader whose metadata comes from read_sharded_metadata (its own uses pickle)."""

        def read_metadata(self, *args, **kwargs):
            md = read_sharded_metadata(str(self.path))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(path)


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses

    class SafePlanner(DefaultLoadPlanner):
        """Non-tensor items (optimizer param_groups) through torch's restricted unpickler; the default
        planner loads them with weights_only=False."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def dcp_load(state: dict, path: str, **kwargs) -> None:
    """torch.distributed.checkpoint.load of `state` from a sharded folder, through SafeReader/SafePlanner."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load(state, storage_reader=_safe_reader(path), planner=_safe_planner(), **kwargs)
    except CheckpointException as e:  # torch gathers each rank's failure into this; the first says why
        errors = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]  # (exception, stack)
        why = next((f"{type(x).__name__}: {first_line(x)}" for x in errors), first_line(e))
        raise CheckpointError(f"checkpoint: {path} cannot be read safely ({why[:200]})") from None


def load_state_dict(path: str, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's "state_dict" entries named in `template` (LightningModule keys, "model.<param>"),
    read into tensors shaped like the template's."""
    if not is_sharded(path):
        return read_meta(path)["state_dict"]
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_sharded_metadata(path)
    for k, v in template.items():
        entry = md.state_dict_metadata.get(f"state_dict.{k}")
        if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != tuple(v.shape):
            raise ValueError(f"{path} has no tensor state_dict.{k} of shape {tuple(v.shape)} (another "
                             "architecture, or not a remoe checkpoint)")
    state = {"state_dict": {k: torch.empty_like(v) for k, v in template.items()}}
    dcp_load(state, path, no_dist=True)
    return state["state_dict"]


# ---- writing ---------------------------------------------------------------------------------------------
def save_atomic(obj, path: str) -> None:
    """torch.save into memory (as Lightning's own save does), written to a temporary file in the target's
    folder, fsync, then renamed over the target: the previous file stays whole until the new one is (a full
    disk or a kill leaves the old one and no partial file; a full disk is an OSError with its errno, where
    torch.save into a file would raise a RuntimeError of its stream writer)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself is durable once the folder is
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def checkpoint_io():
    """Lightning's CheckpointIO plugin for training (train.run: Trainer(plugins=[checkpoint_io()]))."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """save: save_atomic (beside the target, then rename); load: weights_only always."""

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO takes no storage_options")
            save_atomic(checkpoint, path)

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    return AtomicCheckpointIO()


def remove_stale_partials(folder: str | Path) -> None:
    """Delete `.<name>.partial-<pid>` files of save_atomic whose process is gone (a kill mid-save)."""
    remove_leftovers(str(folder), r"\..+\.partial-(?P<pid>\d+)")


def load_checkpoint(path: str) -> tuple[Transformer, Tokenizer, dict]:
    """(model on CPU, tokenizer, checkpoint hyperparameters) from a checkpoint written by training (a file, or
    a sharded folder from trainer=fsdp: its weights only are read). Anything that is not such a checkpoint
    (missing, truncated, foreign, crafted to run code, weights of another architecture) is a CheckpointError
    (a ValueError) whose one line names the file; nothing in it is executed (this module), and no model
    is built whose size the stored weights do not match."""
    ckpt = open_checkpoint(path)  # a file, or a sharded folder's meta.pt (trainer=fsdp)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not (isinstance(hp, dict) and isinstance(hp.get("model"), dict) and isinstance(ckpt.get("tokenizer"), str)
            and (isinstance(ckpt.get("state_dict"), dict) or is_sharded(path))):
        raise CheckpointError(f"checkpoint: {path!r} is not a remoe checkpoint (no model config, weights or "
                              "tokenizer inside)")
    check_format(ckpt, path)
    try:
        cfg = ModelConfig.from_dict(hp["model"])
        check_shapes(cfg, stored_shapes(path, ckpt))
        model = Transformer(cfg)
        weights = load_state_dict(path, {f"model.{k}": v for k, v in model.state_dict().items()})
        state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
        tokenizer = Tokenizer.from_str(ckpt["tokenizer"])
    except Exception as e:  # a config no model can have, weights of another shape, a crafted shard ...
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else "-"
        raise CheckpointError(f"checkpoint: {path!r} cannot be loaded as the model its config describes "
                              f"({type(e).__name__}: {why})") from None
    return model.eval(), tokenizer, hp
