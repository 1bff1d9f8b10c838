"""remoe: ReMoE / TopK MoE / dense language models, trained and compared reproducibly."""

__version__ = "0.1.0"
