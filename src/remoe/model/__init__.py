from .config import PRESETS, ModelConfig, preset
from .regularizers import LambdaController
from .transformer import ModelOutput, Transformer, layer_sparsity

__all__ = ["PRESETS", "ModelConfig", "preset", "LambdaController", "ModelOutput", "Transformer", "layer_sparsity"]
