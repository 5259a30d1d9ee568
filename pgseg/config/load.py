"""YAML → typed :class:`Config`: presets, ``base:`` inheritance, ``--set a.b=value`` overrides, strict types.

A file may start with ``base: <preset name or path>``; its keys then override the base's. Unknown keys, wrong
types and impossible values raise :class:`ConfigError` naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Union, get_args, get_origin, get_type_hints

import yaml

from .schema import Config, ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"
# YAML keys that are Python keywords
_ALIASES = {"lambda": "lambda_"}
_MAX_BASE_DEPTH = 8


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _resolve_source(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    text = str(name_or_path)
    if text in preset_names():
        return PRESETS_DIR / f"{text}.yaml"
    path = Path(text)
    if not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
        path = relative_to / path
    if not path.exists():
        raise ConfigError(f"config {text!r}: no such file, and not a preset (presets: {', '.join(preset_names())})")
    return path


def read_mapping(path: str | Path, kind: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an experiment, a sweep); errors name the ``kind`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{kind} {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {path}: the top level must be a mapping")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        hint = " (a model file: `pgseg config` prints the config stored in it)" if path.suffix == ".safetensors" else ""
        raise ConfigError(f"config {path}: not a YAML text file{hint}") from None
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot be read ({exc.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(name_or_path: str | Path, _depth: int = 0) -> dict[str, Any]:
    """The merged mapping of a config file and its chain of ``base:`` files."""
    if _depth > _MAX_BASE_DEPTH:
        raise ConfigError(f"config {name_or_path}: 'base' chain deeper than {_MAX_BASE_DEPTH} (a cycle?)")
    path = _resolve_source(name_or_path)
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: base: must be a preset name or a path, got {base!r}")
    parent = load_raw(_resolve_source(base, relative_to=path.parent), _depth + 1)
    return deep_merge(parent, data)


def nested(key: str, value: Any) -> dict[str, Any]:
    """``("a.b.c", value)`` → ``{"a": {"b": {"c": value}}}``."""
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{key!r}: empty key")
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` → ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML (``1e-3``, ``[1, 2]``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. npr.phi=0.2")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None
    return nested(key, value)


def with_values(raw: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with each dotted key of ``values`` set to its (already typed) value."""
    for key, value in values.items():
        raw = deep_merge(raw, nested(key, value))
    return raw


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is not None and len(options) == 1:  # X | None: X's own message
            return _coerce(value, options[0], key)
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a bug in the schema, not in the input


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for raw_key, value in data.items():
        name = _ALIASES.get(raw_key, raw_key)
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if name not in names:
            allowed = ", ".join(sorted({next((a for a, n in _ALIASES.items() if n == f), f) for f in names}))
            raise ConfigError(f"{key}: unknown key (allowed here: {allowed})")
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain mapping of a config (YAML key names), the inverse of :func:`from_dict`."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = next((a for a, n in _ALIASES.items() if n == f.name), f.name)
        out[key] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for tracking params and sweep keys)."""
    out = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def load_config(source: str | Path | dict[str, Any] | Config | None = None, overrides: Iterable[str] = (),
                values: Mapping[str, Any] | None = None) -> Config:
    """Load, override, type-check and validate a config.

    ``source``: a preset name (``tiny``), a YAML path, a mapping, a loaded :class:`Config`, or ``None`` for the
    defaults (``pgseg_vit_s``). ``overrides``: the user's text, ``["npr.phi=0.2", ...]``, applied next;
    ``values``: typed values by dotted key (``{"npr.phi": 0.2}``: a sweep's point, a workflow's wiring), applied last.
    """
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, Config):
        raw = to_dict(source)
    elif isinstance(source, dict):
        raw = dict(source)
        base = raw.pop("base", None)
        if base is not None:
            raw = deep_merge(load_raw(base), raw)
    else:
        raw = load_raw(source)
    for item in overrides:
        raw = deep_merge(raw, parse_override(item))
    config = from_dict(Config, with_values(raw, values or {}))
    return config.validate()


def dump_config(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)

