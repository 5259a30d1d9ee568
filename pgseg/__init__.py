"""PGSeg: weakly open-vocabulary semantic segmentation with prototypical guidance, in plain PyTorch.

    from pgseg import load_config, PGSeg
    model = PGSeg.from_config(load_config("tiny"))

This package never imports Ray or MLflow (they live in ``pipelines/``).
"""
from .config import Config, ConfigError, load_config
from .model import PGSeg

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "PGSeg", "load_config", "__version__"]
