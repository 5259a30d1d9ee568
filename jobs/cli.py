"""The ``pgseg`` command: one subcommand per job."""
from __future__ import annotations

import argparse
import sys

from .runtime import loopback_unless_named

from importlib.metadata import version

__version__ = version("pgseg")  # (importing pgseg here would import torch: --help stays fast)


def _config_command(args: argparse.Namespace) -> int:
    from pgseg.config import ConfigError, dump_config, load_config

    try:
        print(dump_config(load_config(args.config, args.set)), end="")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import convert, data, evaluate, run, segment, sweep, train

    parser = argparse.ArgumentParser(prog="pgseg", description="PGSeg on Ray: weakly open-vocabulary segmentation.")
    parser.add_argument("--version", action="version", version=f"pgseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert.add_parser(sub)
    data.add_parser(sub)
    train.add_parser(sub)
    segment.add_parser(sub)
    evaluate.add_parser(sub)
    run.add_parser(sub)
    sweep.add_parser(sub)
    p = sub.add_parser("config", help="print a resolved config (preset or YAML, with --set overrides)")
    p.add_argument("config", nargs="?", default=None, help="preset name or YAML path (default: pgseg_vit_s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.set_defaults(func=_config_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loopback_unless_named(args)
    if args.command == "data":
        from . import data

        return data.run(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
