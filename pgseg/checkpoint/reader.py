"""Reading any checkpoint file safely: ``weights_only`` first; a released ``.pth`` also pickles an OmegaConf config
and apex state, which ``weights_only`` refuses, so it is then unpickled with an allow-list: tensors, storages and
plain containers are rebuilt; every other global named in the pickle becomes an inert :class:`InertObject` that
records its name and arguments and runs nothing."""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

FORMAT = "pgseg-v1"


class CheckpointError(ValueError):
    """The file is missing, truncated, not a checkpoint, or its layout is not the one expected."""


# ------------------------------------------------------------------------------------------ safe unpickling
class InertObject:
    """Stands in for any object a pickle asks for that is not on the allow-list. It records the arguments and the
    state pickle hands it; nothing named by the pickle is imported or executed."""

    pickled_name = "?"
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None  # class-level defaults: pickle's NEWOBJ builds instances without calling __init__

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS of a pickled dict subclass
        if not isinstance(self.state, dict):
            self.state = {}
        self.state[key] = value

    def append(self, value: Any) -> None:  # APPENDS of a pickled list subclass
        if not isinstance(self.state, list):
            self.state = []
        self.state.append(value)

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<inert {self.pickled_name}>"


def _inert_class(module: str, name: str) -> type:
    return type(name, (InertObject,), {"pickled_name": f"{module}.{name}", "__module__": "pgseg.checkpoint.inert"})


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
for _dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool):
    _ALLOWED[("torch", str(_dtype).split(".")[-1])] = _dtype


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage") and isinstance(getattr(torch, name, None), type):
            return getattr(torch, name)
        return _inert_class(module, name)


class _SafePickleModule:
    """A ``pickle_module`` for ``torch.load`` whose Unpickler is the allow-list one."""

    Unpickler = _SafeUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f: Any, **kwargs: Any) -> Any:
        return _SafeUnpickler(f, **kwargs).load()


# ----------------------------------------------------------------------------------------------- reading files
def read_checkpoint_file(path: str | Path) -> Any:
    """The object stored in a checkpoint file, read without executing pickled code.

    ``.safetensors`` files are read as a flat tensor dict. Anything else goes to ``torch.load(weights_only=True)``
    and, if that refuses a global, to the allow-list unpickler (unknown objects become :class:`InertObject`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if not zipfile.is_zipfile(path):
        with path.open("rb") as fh:
            head = fh.read(4)
        if head[:2] == b"PK":
            raise CheckpointError(f"{path}: truncated or damaged checkpoint (a zip archive without its directory)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise CheckpointError(f"{path}: truncated, damaged or not a PyTorch checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on damaged files
        raise CheckpointError(f"{path}: truncated, damaged or not a PyTorch checkpoint ({_first_line(exc)})") from None
    try:  # has globals outside weights_only's list (OmegaConf, apex, ...): read them as inert data
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_SafePickleModule)
    except Exception as exc:  # noqa: BLE001 - any failure here means we cannot read it safely
        raise CheckpointError(f"{path}: cannot be read safely ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat name→tensor mapping inside a loaded checkpoint (``model`` / ``state_dict`` entry or the object
    itself), with any DDP ``module.`` prefix removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: no state_dict found (expected a mapping of parameter names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} entries are not name→tensor pairs, e.g. {bad[0]!r}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def ignored_entries(obj: Any) -> list[str]:
    """What a loaded checkpoint holds besides its state_dict, one line per top-level entry; objects that were not
    plain data are named (they were read as inert data, see :class:`InertObject`, never executed)."""
    if not isinstance(obj, dict):
        return []
    used = next((k for k in ("model", "state_dict", "model_state_dict") if isinstance(obj.get(k), dict)), None)
    lines = []
    for key, value in obj.items():
        if key == used:
            continue
        inert = sorted(_inert_names(value))
        kind = (f"not plain data, read as inert and not executed: {', '.join(inert)}" if inert
                else type(value).__name__)
        lines.append(f"{key} ({kind})")
    return lines


def _inert_names(value: Any, depth: int = 0) -> set[str]:
    if isinstance(value, InertObject):
        return {value.pickled_name} | _inert_names(value.state, depth + 1) | _inert_names(list(value.args), depth + 1)
    if depth > 20:  # deep enough for any config; nothing here can loop forever
        return set()
    if isinstance(value, dict):
        return set().union(*(_inert_names(v, depth + 1) for v in value.values()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return set().union(*(_inert_names(v, depth + 1) for v in value))
    return set()
