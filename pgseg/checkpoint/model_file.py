"""Our model format: one ``.safetensors`` file (tensors only) whose metadata holds the resolved config as YAML."""
from __future__ import annotations

import io
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from ..config import Config, dump_config, load_config
from ..fileio import atomic_write_bytes
from ..model import PGSeg
from .reader import CheckpointError, read_checkpoint_file

FORMAT = "pgseg-v1"

def save_model(model: torch.nn.Module, config: Config, path: str | Path, step: int | None = None) -> Path:
    """Write the model's tensors and its config to one ``.safetensors`` file, atomically; ``step``: the training
    step the model was taken at (a trained model's), kept in the metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: our model files end in .safetensors")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": dump_config(config), **({"step": str(step)} if step is not None else {})}
    return atomic_write_bytes(path, save_safetensors_bytes(tensors, metadata=metadata))


def _metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: not a pgseg model file (no {FORMAT} metadata); convert released "
                              f"checkpoints with `pgseg convert`")
    return meta


def read_model_config(path: str | Path) -> Config:
    """The config stored in one of our model files."""
    return load_config(yaml.safe_load(io.StringIO(_metadata(path)["config"])))


def model_step(path: str | Path) -> int | None:
    """The training step a model file was taken at, or None (converted, or written before files kept it)."""
    step = _metadata(path).get("step")
    return int(step) if step is not None and step.isdigit() else None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """Rebuild a model from one of our model files → (model in eval mode, config)."""
    config = read_model_config(path)
    model = PGSeg.from_config(config)
    tensors = read_checkpoint_file(path)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor's shape differs from the one its stored config builds
        shapes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"{path}: its tensors do not match its own stored config: "
                              f"{'; '.join(shapes[:3]) or exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: does not match its own config: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval(), config
