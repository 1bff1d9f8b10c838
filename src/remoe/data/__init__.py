from .datamodule import LMDataModule

__all__ = ["LMDataModule"]
