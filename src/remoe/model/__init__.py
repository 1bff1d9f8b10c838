"""The model: an architecture-only ModelConfig, the routing methods, the transformer. Names load on first use
(PEP 562), so that the torch-free parts (config.py, knobs.py: what composing the config needs) import without
torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {"ModelConfig": "config", "preset": "presets", "LAMBDA_FLOOR": "regularizers",
          "LambdaController": "regularizers", "METHODS": "routing", "RoutingMethod": "routing",
          "build_method": "routing", "method_of": "routing", "RoutingStats": "stats", "layer_sparsity": "stats",
          "ModelOutput": "transformer", "Transformer": "transformer", "param_counts": "transformer"}
__all__ = ["ModelConfig", "preset", "LAMBDA_FLOOR", "LambdaController", "METHODS", "RoutingMethod",
           "build_method", "method_of", "param_counts", "RoutingStats", "layer_sparsity", "ModelOutput", "Transformer"]

if TYPE_CHECKING:
    from .config import ModelConfig
    from .presets import preset
    from .regularizers import LAMBDA_FLOOR, LambdaController
    from .routing import METHODS, RoutingMethod, build_method, method_of
    from .stats import RoutingStats, layer_sparsity
    from .transformer import ModelOutput, Transformer, param_counts


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
