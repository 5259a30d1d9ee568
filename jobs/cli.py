"""The ``pgseg`` command: one subcommand per job."""
from __future__ import annotations

import argparse
import sys

from .runtime import DefaultsFormatter, loopback_unless_named, refuse_unreachable, user_error

from importlib.metadata import version

__version__ = version("pgseg")  # (importing pgseg here would import torch: --help stays fast)


def _config_command(args: argparse.Namespace) -> int:
    from pgseg.checkpoint import CheckpointError
    from pgseg.config import ConfigError, dump_config, load_config, to_dict as dump_config_dict

    try:
        if args.config and args.config.endswith(".safetensors"):  # the config stored in a model file
            from pgseg.checkpoint import read_model_config

            config = load_config(dump_config_dict(read_model_config(args.config)), args.set)
        else:
            config = load_config(args.config, args.set)
        print(dump_config(config), end="")
    except (ConfigError, CheckpointError) as exc:
        return user_error(exc)
    return 0


class HelpfulParser(argparse.ArgumentParser):
    """Every subcommand's help shows the defaults (its subparsers are of this class too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from . import analyze, convert, data, evaluate, run, segment, serve, sweep, train

    parser = HelpfulParser(prog="pgseg", description="PGSeg on Ray: weakly open-vocabulary segmentation.")
    parser.add_argument("--version", action="version", version=f"pgseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert.add_parser(sub)
    data.add_parser(sub)
    train.add_parser(sub)
    segment.add_parser(sub)
    evaluate.add_parser(sub)
    analyze.add_parser(sub)
    run.add_parser(sub)
    sweep.add_parser(sub)
    serve.add_parser(sub)
    p = sub.add_parser("config", help="print a resolved config (preset or YAML, with --set overrides)")
    p.add_argument("config", nargs="?", default=None, help="preset name, YAML path or model file (.safetensors) (default: pgseg_vit_s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.set_defaults(func=_config_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loopback_unless_named(args)
    refused = refuse_unreachable(args)
    if refused is not None:
        return refused
    if args.command == "data":
        from . import data

        return data.run(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
