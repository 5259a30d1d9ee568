"""The device a command runs on: ``auto`` picks the accelerator that is there; a named one that is not is an error."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (a GPU when there is one, else the CPU)"


def resolve_device(name: str) -> "torch.device":
    """``name`` → a torch device that exists here; ValueError naming the problem otherwise."""
    import torch  # here, not at the top: the command line's help imports DEVICE_HELP and stays fast

    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; use {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is usable here (torch {torch.__version__}, CUDA "
                             f"{torch.version.cuda or 'not built'}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type; use {DEVICE_HELP}")
    return device
