"""``pgseg run EXPERIMENT.yaml`` / ``python -m jobs.run`` (for ``ray job submit``): the stages an experiment names —
sources → download → train → evaluate → analyze — as one workflow; finished stages with unchanged inputs are
skipped, a failed stage is redone by the next run. ``pgseg quickstart`` runs ``configs/experiments/quickstart.yaml``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .runtime import add_ray_options

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "experiments" / "quickstart.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="an experiment YAML (see configs/experiments/)")
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. train.optim.lr=1e-4 or download.processes_count=8 (repeatable)")
    p.add_argument("--workdir", default=None, help="where the stages write (default: the experiment's workdir)")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE",
                   help="run this stage (and the ones after it) even if it finished before")
    add_ray_options(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment's stages as one workflow (skips what is done)")
    add_arguments(p)
    p.set_defaults(func=run)
    q = sub.add_parser("quickstart", help="the whole pipeline on a generated shapes world, on this machine")
    q.add_argument("--epochs", type=int, default=None,
                   help="train for this many epochs instead of the experiment's (longer or shorter)")
    _common(q)
    q.set_defaults(func=quickstart, experiment=str(QUICKSTART))


def _load(args: argparse.Namespace, extra: list[str] = ()):
    from pgseg.config import ConfigError
    from pipelines.flow import load_experiment

    overrides = list(args.set) + list(extra) + ([f"workdir={args.workdir}"] if args.workdir else []) + \
        ([f"address={args.address}"] if args.address else [])
    try:
        return load_experiment(args.experiment, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _execute(experiment, args: argparse.Namespace) -> tuple[int, object]:
    from pgseg.config import ConfigError
    from pipelines.flow import WorkflowError, run_workflow

    from pipelines.runtime import quiet_logs

    quiet_logs(args.verbose)  # (the loopback switch was set by the entry point, before Ray was imported)
    try:
        result = run_workflow(experiment, redo=args.redo)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
    except WorkflowError as exc:
        print(exc.result.table_text())
        print(f"error: {exc}\nrun the same command again to redo the failed stage and the ones after it",
              file=sys.stderr)
        return 1, exc.result
    print(result.table_text())
    return 0, result


def run(args: argparse.Namespace) -> int:
    experiment = _load(args)
    if experiment is None:
        return 2
    return _execute(experiment, args)[0]


def quickstart(args: argparse.Namespace) -> int:
    extra = []
    if args.epochs is not None:
        if args.epochs < 1:
            print(f"error: --epochs must be >= 1, got {args.epochs}", file=sys.stderr)
            return 2
        extra.append(f"train.schedule.epochs={args.epochs}")
    experiment = _load(args, extra)
    if experiment is None:
        return 2
    start = time.perf_counter()
    rc, result = _execute(experiment, args)
    if result is None:
        return rc
    from pipelines.tracking import Tracker, resolve_uri, ui_link

    uri = resolve_uri(experiment.tracking.uri)
    print(f"\nquickstart: {time.perf_counter() - start:.0f} s in all; results in {experiment.root}")
    evaluated = next((o for o in result.outcomes if o.stage == "evaluate" and o.record), None)
    if evaluated is not None:
        import json

        if evaluated.status == "skipped":  # the figures of the run that made them
            for name, r in json.loads(Path(evaluated.record.outputs["results"]).read_text()).items():
                print(f"{name}: mIoU {100 * r['miou']:.2f} (all-background {100 * r['all_background_miou']:.2f}), "
                      f"evaluated before on {r['images']} images with {r['model']}")
        print(f"example overlays: {experiment.root / 'eval'}")
    if any(o.stage == "analyze" and o.record for o in result.outcomes):
        print(f"the groups apart from their names (pgseg analyze): {experiment.root / 'analyze'}")
    tracked = experiment.tracking.enabled
    found = Tracker(uri).client.get_experiment_by_name(experiment.tracking.experiment) if tracked else None
    if uri.startswith("sqlite:///"):
        link = ui_link("http://127.0.0.1:5000", found.experiment_id) if found else "http://127.0.0.1:5000"
        print(f"look at the runs:  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri} "
              f"--host 127.0.0.1 --workers 1   (then open {link})")
    elif uri.startswith(("http://", "https://")) and found:
        print(f"look at the runs in MLflow: {ui_link(uri, found.experiment_id)}")
    else:
        print(f"look at the runs in MLflow at {uri}")
    return rc


def main(argv: list[str] | None = None) -> int:
    from .runtime import entrypoint

    return entrypoint("python -m jobs.run", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
