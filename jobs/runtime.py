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


def quiet_logs() -> None:
    """Our INFO lines, Ray's warnings: the stages and sweeps print what happens, and Ray's INFO lines (Ray Data
    configures its own logger and console handler when imported) would drown them."""
    import ray.data  # noqa: F401 - its logging setup first, then our levels

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # (mlflow reads it per call)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("ray", "ray.data", "tensorboardX"):
        logging.getLogger(name).setLevel(logging.WARNING)


def entrypoint(prog: str, description: str | None, add_arguments, run, argv: list[str] | None = None) -> int:
    """``python -m jobs.X``: parse the job's arguments and run it (the ``pgseg X`` subcommand's twin)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return run(parser.parse_args(argv))
