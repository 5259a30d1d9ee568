"""What every job shares at its edge: the Ray options (``--address``, ``--verbose``), the user-error exit and the
``python -m jobs.X`` entry point. How Ray is started or attached lives in :mod:`pipelines.runtime`."""
from __future__ import annotations

import argparse
import sys

USER_ERROR = 2  # the exit code of every bad input: a message, never a traceback


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Help texts with each option's default when it has a value (not for flags and unset options); descriptions
    keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text \
                and "default:" not in text and (action.option_strings or action.nargs in ("?", "*")):
            text += " (default: %(default)s)"
        return text


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="a Ray cluster to run on (default: $RAY_ADDRESS, else an embedded Ray on 127.0.0.1)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own log lines and progress bars")


def loopback_unless_named(args: argparse.Namespace) -> None:
    """Before anything imports Ray: an embedded Ray (no ``--address``, no ``RAY_ADDRESS``) binds 127.0.0.1 only."""
    from pipelines.runtime import named_address, use_loopback

    if not named_address(getattr(args, "address", None)):
        use_loopback()


def refuse_unreachable(args: argparse.Namespace) -> int | None:
    """Right after parsing, before any stage runs: exit 2 with the reason when the named cluster does not answer."""
    from pgseg.config import ConfigError
    from pipelines.runtime import check_address

    if not hasattr(args, "address"):
        return None
    try:
        check_address(args.address)
    except ConfigError as exc:
        return user_error(exc)
    return None


def user_error(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR


def entrypoint(prog: str, description: str | None, add_arguments, run, argv: list[str] | None = None) -> int:
    """``python -m jobs.X``: parse the job's arguments and run it (the ``pgseg X`` subcommand's twin)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=DefaultsFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    loopback_unless_named(args)
    refused = refuse_unreachable(args)
    return refused if refused is not None else run(args)
