"""``pgseg convert``: a released PGSeg or GroupViT checkpoint → our model file (.safetensors with its config).

The released file is read without executing pickled code. The architecture comes from the checkpoint's own build
config when it is stored as plain data, otherwise from ``--config`` (default: the paper's ``pgseg_vit_s``); either
way every tensor shape is checked, and an unexpected layout fails with the key report.
"""
from __future__ import annotations

import argparse
import sys

from .runtime import user_error


def run(args: argparse.Namespace) -> int:
    from pgseg.checkpoint import CheckpointError, convert_checkpoint, save_model  # (torch: only on this path)
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
