"""Typed experiment configuration (dataclasses loaded from YAML); see :func:`load_config`."""
from .load import deep_merge, dump_config, flatten, from_dict, load_config, parse_override, preset_names, to_dict
from .schema import (Config, ConfigError, DataConfig, EvalConfig, ImageEncoderConfig, LossConfig, ModelConfig,
                     NPRConfig, OptimConfig, ScheduleConfig, TextEncoderConfig, TrackingConfig, TrainConfig)

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "ImageEncoderConfig", "LossConfig", "ModelConfig",
    "NPRConfig", "OptimConfig", "ScheduleConfig", "TextEncoderConfig", "TrackingConfig", "TrainConfig",
    "deep_merge", "dump_config", "flatten", "from_dict", "load_config", "parse_override", "preset_names", "to_dict",
]
