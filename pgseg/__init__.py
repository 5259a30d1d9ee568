"""PGSeg: weakly open-vocabulary semantic segmentation with prototypical guidance, in plain PyTorch.

    from pgseg import load_config, PGSeg
    model = PGSeg.from_config(load_config("tiny"))

This package never imports Ray or MLflow (they live in ``pipelines/``). Its names load on first use, so that
importing a light part (``pgseg.config``) does not import torch.
"""
from importlib import import_module

__version__ = "0.1.0"
_NAMES = {"Config": "pgseg.config", "ConfigError": "pgseg.config", "load_config": "pgseg.config",
          "PGSeg": "pgseg.model"}
__all__ = [*_NAMES, "__version__"]


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'pgseg' has no attribute {name!r}")
