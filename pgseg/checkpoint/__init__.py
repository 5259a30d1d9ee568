"""Checkpoints: safe reading of any checkpoint file (``reader``), conversion of the released PGSeg and GroupViT
checkpoints (``released``, SPEC §7), and our own model format (``model_file``)."""
from .model_file import FORMAT, load_model, model_step, read_model_config, save_model
from .reader import CheckpointError, InertObject, extract_state_dict, ignored_entries, read_checkpoint_file
from .released import (KeyReport, build_config_values, convert_checkpoint, convert_file, convert_released,
                       init_from_checkpoint, load_released)

__all__ = ["CheckpointError", "FORMAT", "InertObject", "KeyReport", "build_config_values", "convert_checkpoint",
           "convert_file", "convert_released", "extract_state_dict", "ignored_entries", "init_from_checkpoint",
           "load_model", "load_released", "model_step", "read_checkpoint_file", "read_model_config", "save_model"]
