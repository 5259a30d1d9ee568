"""``pgseg eval`` / ``python -m jobs.evaluate``: zero-shot segmentation mIoU of a model file on datasets in their
published layouts (or any folder), on Ray; the table printed and logged to MLflow."""
from __future__ import annotations

import argparse
import sys
from functools import partial

from pgseg.config.schema import RESIZE_RULES

from .runtime import add_ray_options, user_error


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a pgseg model file (.safetensors)")
    p.add_argument("--dataset", action="append", default=[], metavar="KIND:ROOT",
                   help="voc|context|coco_object|imagenet_s|lvis|folder and its root (repeatable)")
    p.add_argument("--classification", action="append", default=[], metavar="PATH",
                   help="zero-shot classification (top-1/top-5, ImageNet protocol) on a class-folder tree or "
                        "webdataset shards with jpg+cls (repeatable); needs --class-names")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help="class names for --classification: one per line in label order, or 'FOLDER NAME' lines")
    p.add_argument("--bg-thresh", type=float, default=None, help="override every dataset's background threshold")
    p.add_argument("--true-labels", action="store_true", help="True Label Guidance (Table 2)")
    p.add_argument("--window", type=int, default=None, help="default: the model config's eval.window")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: the model config's eval.stride)")
    p.add_argument("--short-side", type=int, default=None,
                   help="images resized to this short side (default: the model config's eval.short_side)")
    p.add_argument("--resize", choices=RESIZE_RULES, default=None,
                   help="image resize: uint8 = the release's (OpenCV bilinear on 8-bit pixels, the default), "
                        "float = torch bilinear on the normalised image")
    p.add_argument("--actors", type=int, default=1, help="model replicas (Ray Data actors)")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--overlays", type=int, default=8,
                   help="images drawn (image | ground truth | prediction) per dataset, into MLflow and --out")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write each dataset's table (.md), figures (.json) and overlays (DIR/<dataset>/) here")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--track", default=None, metavar="URI",
                   help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--no-track", action="store_true", help="log nothing to MLflow")
    p.add_argument("--run-id", default=None, help="log into this MLflow run (e.g. the training run)")
    add_ray_options(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot segmentation mIoU (SPEC §6 protocol) on Ray, logged to MLflow")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pgseg.checkpoint import CheckpointError, read_model_config
    from pgseg.datasets import open_dataset
    from pgseg.segment import ProtocolSettings, background_threshold

    if not args.dataset and not args.classification:
        return user_error("give --dataset KIND:ROOT and/or --classification PATH")
    if args.classification and not args.class_names:
        return user_error("--classification needs --class-names FILE")
    if args.overlays < 0 or args.actors < 1:
        return user_error("--overlays must be >= 0 and --actors >= 1")
    try:
        config = read_model_config(args.checkpoint)
        e = config.eval
        plans = []  # (dataset, its protocol settings)
        for dataset in (open_dataset(spec) for spec in args.dataset):
            bg = background_threshold(args.bg_thresh, e, dataset.bg_thresh)
            plans.append((dataset, ProtocolSettings.of(e, bg, window=args.window, stride=args.stride,
                                                       short_side=args.short_side, resize=args.resize)))
        if args.out:
            from pgseg.evaluate import result_paths

            from pgseg.fileio import writable_folder

            writable_folder(args.out, "--out")
            there = [str(p) for d, _ in plans for p in result_paths(args.out, d.name) if p.exists()]
            if there and not args.overwrite:
                raise ValueError(f"--out {args.out} already holds {', '.join(there)}: add --overwrite to replace")
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        return user_error(exc)
    from pipelines.evaluate import evaluate_many
    from pipelines.runtime import quiet_logs, start_ray
    from pipelines.tracking import log_classification, log_eval

    start_ray(args.address, verbose=args.verbose)
    quiet_logs(args.verbose)
    run_id = args.run_id
    evaluations = []  # (evaluation → results, their MLflow logger): segmentation sets (one actor pool), classification
    if plans:
        evaluations.append((partial(evaluate_many, args.checkpoint, plans, actors=args.actors, use_gpu=args.gpu,
                                    true_labels=args.true_labels, overlays=args.overlays), log_eval))
    for source in args.classification:
        evaluations.append((partial(_one_classification, args, source), log_classification))
    for run_evaluations, log_result in evaluations:
        try:
            results = run_evaluations()
        except (ValueError, FileNotFoundError) as exc:
            return user_error(exc)
        for result in results:
            run_id = _report(result, args, log_result, run_id)
    return 0


def _one_classification(args: argparse.Namespace, source: str) -> list:
    from pipelines.evaluate import evaluate_classification

    return [evaluate_classification(args.checkpoint, source, args.class_names, actors=args.actors, use_gpu=args.gpu)]


def _report(result, args: argparse.Namespace, log_result, run_id: str | None) -> str | None:
    """Print one evaluation's table, write its files, log it to MLflow; returns the MLflow run it went to."""
    from pgseg.evaluate import EvalResult
    from pipelines.tracking import resolve_uri

    print(result.table_text())
    if isinstance(result, EvalResult):  # a segmentation set
        if result.hint():
            print(f"hint: {result.hint()}", file=sys.stderr)
        if args.out:
            print(f"table, figures and overlays in {result.write(args.out)}")
    if not args.no_track:
        run_id = log_result(result, resolve_uri(args.track), run_id=run_id)
        print(f"logged to MLflow run {run_id}")
    return run_id


def main(argv: list[str] | None = None) -> int:
    from .runtime import entrypoint

    return entrypoint("python -m jobs.evaluate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
