from .config import ModelConfig
from .presets import preset
from .regularizers import LAMBDA_FLOOR, LambdaController
from .routing import METHODS, RoutingMethod, build_method
from .stats import RoutingStats, layer_sparsity
from .transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "preset", "LAMBDA_FLOOR", "LambdaController", "METHODS", "RoutingMethod",
           "build_method", "RoutingStats", "layer_sparsity", "ModelOutput", "Transformer"]
