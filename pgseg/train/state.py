"""What a training run saves and resumes from, in one folder: rank 0's training state (model, optimiser, schedule,
scaler, the run's progress and config) and each rank's own RNG streams with digests of its replica."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_model
from ..config import Config, dump_config
from ..model import PGSeg
from .step import TrainStep

STATE_FILE = "state.pt"  # model, optimiser, scheduler, scaler, step, data position (rank 0)
RANK_FILE = "rank{rank}.pt"  # each rank's RNG streams and digests of its parameters and prototype buffers


def state_digests(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of the parameters and of the prototype buffers (``mu``): equal digests = bitwise-equal replicas."""
    digests = {"parameters": hashlib.sha256(), "prototypes": hashlib.sha256()}
    parameters = {name for name, _ in model.named_parameters()}
    for name, tensor in model.state_dict().items():
        kind = "prototypes" if name.endswith(".mu") else "parameters" if name in parameters else None
        if kind:
            digests[kind].update(name.encode())
            digests[kind].update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {k: v.hexdigest() for k, v in digests.items()}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(folder: str | Path, step: TrainStep, progress: dict[str, Any]) -> None:
    """Rank 0 writes the training state with ``progress`` (step, data position, counters), every rank its RNG
    streams and digests."""
    folder, rank = Path(folder), step.world.rank
    if rank == 0:
        torch.save({**step.state_dict(), **progress, "world_size": step.world.world,
                    "config": dump_config(step.config)}, folder / STATE_FILE)
    torch.save({"rng": rng_state(), "digests": state_digests(step.model)}, folder / RANK_FILE.format(rank=rank))


def load_state(folder: str | Path, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the training state, this rank's RNG streams or None when the folder has none for it)."""
    folder = Path(folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    rank_path = folder / RANK_FILE.format(rank=rank)
    own = torch.load(rank_path, map_location="cpu", weights_only=True) if rank_path.is_file() else None
    return state, (own or {}).get("rng")


def export_model(folder: str | Path, config: Config, path: str | Path) -> Path:
    """The model of a saved training state as one of our ``.safetensors`` model files."""
    state, _ = load_state(folder)
    model = PGSeg.from_config(config)
    model.load_state_dict(state["model"])
    return save_model(model, config, path, step=state["step"])
