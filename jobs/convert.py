"""``pgseg convert``: a released PGSeg or GroupViT checkpoint → our model file (.safetensors with its config).

The released file is read without executing pickled code. The architecture comes from the checkpoint's own build
config when it is stored as plain data, otherwise from ``--config`` (default: the paper's ``pgseg_vit_s``); either
way every tensor shape is checked, and an unexpected layout fails with the key report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .runtime import user_error

if TYPE_CHECKING:
    from pgseg.checkpoint import KeyReport
    from pgseg.config import Config
    from pgseg.model import PGSeg


def overrides_from_build_config(obj: Any) -> list[str]:
    """``--set`` items for the architecture in a released checkpoint's plain-dict ``config['model']`` (if any)."""
    model = obj.get("config", {}).get("model") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("img_encoder"), dict):
        return []
    img, txt = model["img_encoder"], model.get("text_encoder", {})
    items = [f"model.image.{ours}={json.dumps(img[theirs])}" for ours, theirs in (
        ("img_size", "img_size"), ("patch_size", "patch_size"), ("embed_dim", "embed_dim"), ("depths", "depths"),
        ("num_heads", "num_heads"), ("num_group_tokens", "num_group_tokens"),
        ("num_output_groups", "num_output_groups"), ("mlp_ratio", "mlp_ratio"), ("drop_path_rate", "drop_path_rate"),
        ("hard_assignment", "hard_assignment"), ("gumbel", "hard_assignment")) if theirs in img]
    for key in ("context_length", "width", "layers", "vocab_size"):
        if key in txt:
            items.append(f"model.text.{key}={json.dumps(txt[key])}")
    if "width" in txt:
        items.append(f"model.text.heads={max(int(txt['width']) // 64, 1)}")  # the release hard-codes width // 64
    for ours, theirs in (("output_dim", "output_dim"), ("contrast_temperature", "contrast_temperature"),
                         ("proj_num_layers", "proj_num_layers")):
        if theirs in model:
            items.append(f"model.{ours}={json.dumps(model[theirs])}")
    return items  # JSON values are YAML, as --set parses them


def convert_checkpoint(path: str | Path, source: str, config: str | None = None,
                       sets: Sequence[str] = ()) -> tuple["PGSeg", "Config", "KeyReport"]:
    """A released checkpoint → (our model in official mode, loaded; its config; the key report). The architecture
    comes from the file's plain-data build config unless ``config`` (a preset or YAML) names one."""
    from pgseg.checkpoint import convert_file, read_checkpoint_file
    from pgseg.config import load_config
    from pgseg.model import PGSeg

    raw = read_checkpoint_file(path)
    arch = overrides_from_build_config(raw) if config is None else []
    resolved = load_config(config or "pgseg_vit_s", [*arch, "npr.mode=official", *sets])
    model = PGSeg.from_config(resolved)
    converted, report = convert_file(path, model, source, raw)
    if report.ok:
        model.load_state_dict(converted, strict=False)
    return model, resolved, report


def run(args: argparse.Namespace) -> int:
    from pgseg.checkpoint import CheckpointError, save_model
    from pgseg.config import ConfigError

    try:
        model, config, report = convert_checkpoint(args.input, getattr(args, "from"), args.config, args.set)
        print(report.text())
        if not report.ok:
            print(f"error: {args.input} does not have the {getattr(args, 'from')} layout of this architecture "
                  f"(see the report above); nothing was written", file=sys.stderr)
            return 2
        out = save_model(model, config, args.output)
    except (CheckpointError, ConfigError) as exc:
        return user_error(exc)
    print(f"wrote {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a released PGSeg/GroupViT checkpoint to a pgseg model file",
                       description=__doc__)
    p.add_argument("--from", required=True, choices=["pgseg-official", "groupvit-official"],
                   help="layout of the input checkpoint")
    p.add_argument("--config", default=None, help="architecture preset or YAML (default: from the checkpoint, "
                   "else pgseg_vit_s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("input", help="released checkpoint (.pth)")
    p.add_argument("output", help="our model file to write (.safetensors)")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.convert")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
