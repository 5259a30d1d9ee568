"""How a job attaches to Ray: the cluster of a Ray job (RAY_ADDRESS or --address), else an embedded local Ray whose
dashboard (the state API Ray Train relies on) listens on 127.0.0.1 only."""
from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING)


def entrypoint(prog: str, description: str | None, add_arguments, run, argv: list[str] | None = None) -> int:
    """``python -m jobs.X``: parse the job's arguments and run it (the ``pgseg X`` subcommand's twin)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return run(parser.parse_args(argv))
