"""Counting the operations that make the host wait for a GPU, on any device (CPU included, so CI can).

A CUDA kernel launch is asynchronous; an op whose result the host needs (a Python scalar, an output whose
size depends on the data) blocks the CPU until the GPU has finished everything queued before it, and the
GPU then idles while the CPU queues the next kernels. On a CPU these ops cost nothing extra, which is why
they are counted rather than timed. Two hooks, because `Tensor.tolist()` never reaches the dispatcher:

  dispatcher level  aten._local_scalar_dense (.item(), int(t), float(t), bool(t)), nonzero (not
                    nonzero_static), bincount (CUDA sizes its output from the max), repeat_interleave
                    with tensor repeats and no output_size (its aten.repeat_interleave.Tensor), masked_select, unique*,
                    equal, is_nonzero,
                    indexing with a boolean mask (aten.index / index_put with a bool index);
  Python level      Tensor.tolist() and Tensor.numpy() (a device-to-host copy on a GPU).

On a GPU the suite uses torch.cuda.set_sync_debug_mode as well (it sees every real sync, this sees the
ones that would be).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ALWAYS = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "_unique", "_unique2", "unique_dim",
          "unique_consecutive", "equal", "is_nonzero"}
PYTHON = {"tolist", "numpy"}


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def sync_op(func, args, kwargs) -> str | None:
    """The name under which `func(*args, **kwargs)` counts as a host sync, or None."""
    name = func._schema.name.split("::")[-1]
    if name in ALWAYS:
        return name
    if name == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
        return "repeat_interleave (no output_size)"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1 and _bool_index(args[1]):
        return f"{name} (boolean mask)"
    return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = sync_op(func, args, kwargs)
        if name:
            self.counts[name] += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in PYTHON:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class CountSyncs:
    """with CountSyncs() as syncs: ...  ->  syncs.counts (Counter by op), syncs.total."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._modes = (_Function(self.counts), _Dispatch(self.counts))

    def __enter__(self) -> CountSyncs:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
