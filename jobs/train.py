"""``pgseg train`` / ``python -m jobs.train``: load the config, check it (and the cluster's room for it) before any
training starts, then run :func:`pipelines.train.fit` on the Ray cluster of the job (RAY_ADDRESS) or an embedded
local one."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .runtime import add_ray_options, user_error


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--name", default=None, help="run name (= train.name): the same name again continues that run")
    add_ray_options(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train PGSeg on Ray Train (resumable, fault tolerant, tracked in MLflow)")
    add_arguments(p)
    p.set_defaults(func=run)


def _local_cpus() -> float:
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run(args: argparse.Namespace) -> int:
    from pgseg.config import ConfigError, load_config
    from pipelines.runtime import check_resources
    from pipelines.tracking import check_uri, resolve_uri
    from pipelines.train import TrainingError, fit, plan_training

    address = args.address or os.environ.get("RAY_ADDRESS")
    try:
        overrides = list(args.set) + ([f"train.name={args.name}"] if args.name else [])
        plan = plan_training(load_config(args.config, overrides))
        if plan.config.tracking.enabled:  # a server that does not answer is said before Ray starts
            check_uri(resolve_uri(plan.config.tracking.uri))
        if not address:  # an embedded Ray on this machine: check before starting it
            check_resources(plan.config, _local_cpus())
    except (ConfigError, ValueError) as exc:
        return user_error(exc)
    from pipelines.runtime import quiet_logs, start_ray

    start_ray(address, verbose=args.verbose)
    quiet_logs(args.verbose)
    try:
        result = fit(plan)
    except ConfigError as exc:
        return user_error(exc)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {"name": result.name, "step": result.step, "total_steps": result.total_steps,
               "finished": result.finished, "checkpoint": result.checkpoint, "model": result.model_file,
               "mlflow_run": result.run_id, "registered_model": result.champion, "loss": result.metrics.get("loss")}
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .runtime import entrypoint

    return entrypoint("python -m jobs.train", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
