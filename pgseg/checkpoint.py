"""Checkpoints: safe reading of any checkpoint file, our own model format, and conversion of the released PGSeg
and GroupViT checkpoints (SPEC §7).

Safety: a released ``.pth`` also pickles an OmegaConf config and apex state, so ``weights_only`` refuses it. We
then unpickle with an allow-list: tensors, storages and plain containers are rebuilt; every other global named in
the pickle becomes an inert :class:`InertObject` that records its name and arguments and runs nothing.

Our format: one ``.safetensors`` file (tensors only) whose metadata holds the resolved config as YAML.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as save_safetensors_bytes

from .config import Config, dump_config, load_config
from .fileio import atomic_write_bytes

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


# ------------------------------------------------------------------------------------------------- conversion
# keys of the released layout that our model does not have, on purpose
DROPPED_ON_PURPOSE = ("img_encoder.mapping_text.",)  # the released code builds it and never calls it
# keys a GroupViT checkpoint lacks: the PG units, the PG temperature and the T-NPR buffer keep their init
PGSEG_ONLY = ("img_encoder.layers.0.downsample_spatial.", "img_encoder.layers.1.downsample_spatial.",
              "img_encoder.logit_scale", "text_encoder.Atten.")
# the multi-label loss's own temperature: in files trained with that loss (GroupViT gcc_yfcc_30e, multi_label 3),
# not in the others (gcc_redcap_30e, the PGSeg release); loaded when the model has that loss, else dropped
MULTI_LABEL_SCALE = "multi_label_logit_scale"


@dataclass
class KeyReport:
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, left out on purpose (see notes)
    notes: list[str] = field(default_factory=list)  # why, one line each
    ignored: list[str] = field(default_factory=list)  # the file's entries besides the weights (ignored_entries)
    missing: list[str] = field(default_factory=list)  # in our model, not in the checkpoint
    expected_missing: list[str] = field(default_factory=list)  # missing, as the source layout implies
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in our model
    mismatched: list[str] = field(default_factory=list)  # same name, different shape

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def text(self) -> str:
        lines = [f"loaded: {len(self.loaded)} tensors", f"dropped on purpose: {len(self.dropped)}"]
        lines += [f"  {note}" for note in self.notes]
        if self.ignored:
            lines.append(f"ignored entries of the file: {len(self.ignored)}")
            lines += [f"  {entry}" for entry in self.ignored]
        if self.expected_missing:
            lines.append(f"kept at init (not in this layout): {len(self.expected_missing)}")
            lines += [f"  {k}" for k in self.expected_missing]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.mismatched)):
            lines.append(f"{title}: {len(keys)}")
            lines += [f"  {k}" for k in keys]
        return "\n".join(lines)


def _is_projector_conv(name: str, value: torch.Tensor) -> bool:
    return value.ndim == 3 and value.shape[-1] == 1 and (".linear_hidden.0.weight" in name or ".linear_out.weight" in name)


def convert_released(state_dict: dict[str, torch.Tensor], model: torch.nn.Module,
                     source: str = "pgseg-official") -> tuple[dict[str, torch.Tensor], KeyReport]:
    """Map a released PGSeg (``pgseg-official``) or GroupViT (``groupvit-official``) state_dict onto ``model``.

    Returns the converted state_dict (only keys of ``model``) and the key report; nothing is loaded here.
    """
    if source not in ("pgseg-official", "groupvit-official"):
        raise CheckpointError(f"unknown source layout {source!r} (use pgseg-official or groupvit-official)")
    ours = model.state_dict()
    report = KeyReport()
    out: dict[str, torch.Tensor] = {}
    mismatched: set[str] = set()
    for name, value in state_dict.items():
        if name.startswith(DROPPED_ON_PURPOSE) or (name == MULTI_LABEL_SCALE and name not in ours):
            report.dropped.append(name)
            continue
        if _is_projector_conv(name, value):
            value = value[..., 0]  # 1×1 Conv1d weight [out, in, 1] → Linear weight [out, in]
        if name not in ours:
            report.unexpected.append(name)
        elif ours[name].shape != value.shape:
            mismatched.add(name)
            report.mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(ours[name].shape)}")
        else:
            out[name] = value.to(ours[name].dtype)
            report.loaded.append(name)
    if any(k.startswith(DROPPED_ON_PURPOSE) for k in report.dropped):
        report.notes.append("img_encoder.mapping_text.*: built by the release, never used")
    if MULTI_LABEL_SCALE in report.dropped:
        report.notes.append(f"{MULTI_LABEL_SCALE}: the file's multi-label loss temperature; this model trains "
                            f"without that loss (set loss.multi_label to keep it)")
    for name in ours:
        if name not in out and name not in mismatched:
            if (source == "groupvit-official" and name.startswith(PGSEG_ONLY)) or name == MULTI_LABEL_SCALE:
                report.expected_missing.append(name)
            else:
                report.missing.append(name)
    if source == "groupvit-official":
        found = [k for k in state_dict if k.startswith(PGSEG_ONLY)]
        if found:
            report.unexpected.extend(f"{k} (a PGSeg key in a GroupViT checkpoint: use --from pgseg-official)" for k in found[:3])
    return out, report


def convert_file(path: str | Path, model: torch.nn.Module, source: str | None = None,
                 raw: Any = None) -> tuple[dict[str, torch.Tensor], KeyReport]:
    """:func:`convert_released` on a checkpoint file (read safely unless ``raw``, its loaded object, is given),
    its other entries listed in the report. ``source`` None: told by the keys (a file without PG units is a
    GroupViT one; a PGSeg file into a model without PG units loads all but them)."""
    raw = read_checkpoint_file(path) if raw is None else raw
    state_dict = extract_state_dict(raw, str(path))
    if source is None:
        own_npr = any(k.startswith(PGSEG_ONLY) for k in model.state_dict())
        file_npr = any(k.startswith(PGSEG_ONLY) for k in state_dict)
        source = "pgseg-official" if file_npr and own_npr else "groupvit-official"
        if file_npr and not own_npr:  # its PG units have nowhere to go
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(PGSEG_ONLY)}
    converted, report = convert_released(state_dict, model, source)
    report.ignored = ignored_entries(raw)
    return converted, report


def load_released(model: torch.nn.Module, path: str | Path, source: str = "pgseg-official") -> KeyReport:
    """Read a released checkpoint safely, convert it and load it into ``model``; fail on an unexpected layout."""
    converted, report = convert_file(path, model, source)
    if not report.ok:
        raise CheckpointError(f"{path}: the layout does not match the model ({source}):\n{report.text()}")
    model.load_state_dict(converted, strict=False)
    return report


def init_from_checkpoint(model: torch.nn.Module, path: str | Path) -> KeyReport:
    """Initialise ``model`` from a released PGSeg or GroupViT checkpoint or one of our model files (the layout is
    told by its keys: a file without PG units initialises everything but them, as the official recipe does)."""
    converted, report = convert_file(path, model)
    if not report.ok:
        raise CheckpointError(f"{path}: cannot initialise this model from it:\n{report.text()}")
    model.load_state_dict(converted, strict=False)
    return report


# -------------------------------------------------------------------------------------------------- our format
def save_model(model: torch.nn.Module, config: Config, path: str | Path) -> Path:
    """Write the model's tensors and its config to one ``.safetensors`` file, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: our model files end in .safetensors")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, save_safetensors_bytes(tensors, metadata={"format": FORMAT,
                                                                              "config": dump_config(config)}))


def read_model_config(path: str | Path) -> Config:
    """The config stored in one of our model files."""
    from safetensors import safe_open

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
    return load_config(yaml.safe_load(io.StringIO(meta["config"])))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """Rebuild a model from one of our model files → (model in eval mode, config)."""
    from .model import PGSeg

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
