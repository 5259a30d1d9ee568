"""``pgseg analyze CHECKPOINT --data VOC_FOLDER`` / ``python -m jobs.analyze``: what a model's groups do apart from
their names (oracle-group mIoU beside the protocol's mIoU), the compactness and richness of the group embeddings
and the model's parameters and FLOPs; printed, written to ``--out`` and logged to MLflow. Runs in this process
(no Ray): an analysis reads a few hundred images."""
from __future__ import annotations

import argparse
import sys

from .runtime import user_error


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a pgseg model file (.safetensors)")
    p.add_argument("--data", action="append", required=True, metavar="FOLDER|KIND:ROOT",
                   help="a VOC-format folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/val.txt, "
                        "optional class_names.txt), or KIND:ROOT as for `pgseg eval` (repeatable)")
    p.add_argument("--max-images", type=int, default=None, help="analyse only the first N images of each set")
    p.add_argument("--image-size", type=int, default=None,
                   help="the image size of the FLOP count (default: the model's training size)")
    p.add_argument("--bg-thresh", type=float, default=None, help="override the sets' background threshold")
    p.add_argument("--out", default=None, metavar="DIR", help="also write DIR/<set>/analysis.{json,md} and the PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace an analysis already in --out")
    p.add_argument("--track", default=None, metavar="URI",
                   help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--no-track", action="store_true", help="log nothing to MLflow")
    p.add_argument("--run-id", default=None, help="log into this MLflow run (e.g. the training run)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="oracle-group mIoU, group-embedding compactness/richness, params and FLOPs")
    add_arguments(p)
    p.set_defaults(func=run)


def _dataset(spec: str):
    from pathlib import Path

    from pgseg.datasets import open_dataset, voc

    if Path(spec).is_dir():
        return voc(spec)
    if ":" in spec and spec.partition(":")[0].isidentifier():
        return open_dataset(spec)
    raise FileNotFoundError(f"--data {spec}: no such folder (give a VOC-format folder or KIND:ROOT)")


def run(args: argparse.Namespace) -> int:
    from pgseg.checkpoint import CheckpointError, load_model

    if args.max_images is not None and args.max_images < 1:
        return user_error("--max-images must be >= 1")
    if args.image_size is not None and args.image_size < 1:
        return user_error("--image-size must be >= 1")
    try:
        from pgseg.segment import ProtocolSettings, background_threshold

        model, config = load_model(args.checkpoint)
        datasets = [_dataset(spec) for spec in args.data]
        plans = [(d, ProtocolSettings.of(config.eval, background_threshold(args.bg_thresh, config.eval, d.bg_thresh)))
                 for d in datasets]
        if args.out:
            from pgseg.analyze import result_paths
            from pgseg.fileio import writable_folder

            writable_folder(args.out, "--out")
            there = [str(p) for d in datasets for p in result_paths(args.out, d.name) if p.exists()]
            if there and not args.overwrite:
                raise ValueError(f"--out {args.out} already holds {', '.join(there)}: add --overwrite to replace")
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        return user_error(exc)
    from pgseg.analyze import analyze

    results = []
    for dataset, settings in plans:
        try:
            result = analyze(model, dataset, settings, args.image_size or config.data.img_size, args.max_images)
        except (ValueError, FileNotFoundError) as exc:
            return user_error(exc)
        print(result.text())
        if args.out:
            print(f"analysis and pictures in {result.write(args.out)}")
        results.append(result)
    if not args.no_track:
        from pipelines.tracking import log_analysis, resolve_uri

        run_id = log_analysis(results, resolve_uri(args.track), run_id=args.run_id)
        print(f"logged to MLflow run {run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .runtime import entrypoint

    return entrypoint("python -m jobs.analyze", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
