"""``pgseg sweep --config SWEEP.yaml`` / ``python -m jobs.sweep`` (for ``ray job submit``): a Ray Tune sweep of
training runs (see pipelines/tune/). With an experiment in the sweep file, its sources and download stages run
first (skipped when done, as in ``pgseg run``). The same command again resumes an interrupted sweep: finished
trials are kept, the others continue from their checkpoints. Prints the summary table (also in MLflow)."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .runtime import add_ray_options, user_error


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a sweep YAML (see configs/sweeps/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the trials' base training config, e.g. schedule.epochs=2 (repeatable)")
    p.add_argument("--workdir", default=None,
                   help="where the sweep (and its experiment's data stages) write; the sweep goes to "
                        "<workdir>/sweeps/<name> (default: the experiment's workdir, else outputs)")
    add_ray_options(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="an ablation sweep on Ray Tune (resumable; summary table in MLflow)")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.runtime import quiet_logs  # (the entry point set the loopback switch before Ray was imported)
    from pgseg.config import ConfigError
    from pipelines.tune import load_sweep

    try:
        spec = load_sweep(args.config, args.set, args.workdir)
    except ConfigError as exc:
        return user_error(exc)
    quiet_logs(args.verbose)
    # `ray job stop` sends SIGTERM: Tune saves its state on SIGINT, so the sweep can be resumed
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        return _sweep(spec, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sweep(spec, args: argparse.Namespace) -> int:
    from pgseg.config import ConfigError
    from pipelines.tune import SweepInterrupted, run_sweep

    if spec.data_stages is not None:
        from pipelines.flow import WorkflowError, run_workflow

        try:
            run_workflow(spec.data_stages)
        except ConfigError as exc:
            return user_error(exc)
        except WorkflowError as exc:
            print(f"error: the experiment's data stages failed: {exc}", file=sys.stderr)
            return 1
    from pipelines.runtime import start_ray

    start_ray(args.address, verbose=args.verbose)
    try:
        result = run_sweep(spec)
    except ConfigError as exc:
        return user_error(exc)
    except SweepInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    print(f"\nsweep {result.name}: {len(result.rows)} trial(s) in {result.root}\n")
    print(result.markdown)
    if result.best is not None:
        print(f"best: {result.best.label} ({result.best.last.get(spec.metric):.4f} {spec.metric})")
    for row in result.rows:
        if row.error:
            print(f"trial {row.label} failed: {row.error}", file=sys.stderr)
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    from .runtime import entrypoint

    return entrypoint("python -m jobs.sweep", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
