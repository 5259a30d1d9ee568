"""Conversion of the released PGSeg and GroupViT checkpoints to our model (SPEC §7): the key mapping, the report
of what was loaded, dropped and kept at init, and the architecture a released file's build config describes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import Config, load_config
from ..model import PGSeg
from .reader import CheckpointError, extract_state_dict, ignored_entries, read_checkpoint_file

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


# ------------------------------------------------------------------------------------- the released architecture
def build_config_values(obj: Any) -> dict[str, Any]:
    """Our config values (dotted key → value) for the architecture in a released checkpoint's plain-dict
    ``config['model']``; empty when the file stores none as plain data."""
    model = obj.get("config", {}).get("model") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("img_encoder"), dict):
        return {}
    img, txt = model["img_encoder"], model.get("text_encoder", {})
    values = {f"model.image.{ours}": img[theirs] for ours, theirs in (
        ("img_size", "img_size"), ("patch_size", "patch_size"), ("embed_dim", "embed_dim"), ("depths", "depths"),
        ("num_heads", "num_heads"), ("num_group_tokens", "num_group_tokens"),
        ("num_output_groups", "num_output_groups"), ("mlp_ratio", "mlp_ratio"), ("drop_path_rate", "drop_path_rate"),
        ("hard_assignment", "hard_assignment"), ("gumbel", "hard_assignment")) if theirs in img}
    values.update({f"model.text.{key}": txt[key] for key in ("context_length", "width", "layers", "vocab_size")
                   if key in txt})
    if "width" in txt:
        values["model.text.heads"] = max(int(txt["width"]) // 64, 1)  # the release hard-codes width // 64
    values.update({f"model.{ours}": model[theirs] for ours, theirs in (
        ("output_dim", "output_dim"), ("contrast_temperature", "contrast_temperature"),
        ("proj_num_layers", "proj_num_layers")) if theirs in model})
    return values


def convert_checkpoint(path: str | Path, source: str, config: str | None = None,
                       sets: Sequence[str] = ()) -> tuple[PGSeg, Config, KeyReport]:
    """A released checkpoint → (our model in official mode, loaded; its config; the key report). The architecture
    comes from the file's plain-data build config unless ``config`` (a preset or YAML) names one; ``sets`` (the
    user's KEY=VALUE) come last."""
    raw = read_checkpoint_file(path)
    arch = build_config_values(raw) if config is None else {}
    resolved = load_config(load_config(config or "pgseg_vit_s", values={**arch, "npr.mode": "official"}), sets)
    model = PGSeg.from_config(resolved)
    converted, report = convert_file(path, model, source, raw)
    if report.ok:
        model.load_state_dict(converted, strict=False)
    return model, resolved, report
