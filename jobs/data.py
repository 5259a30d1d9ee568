"""``pgseg data sources | download | import | shapes | inspect`` (and ``python -m jobs.data …`` for ``ray job submit``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from .runtime import add_ray_options, user_error


def _source_spec(text: str, args: argparse.Namespace):
    from pipelines.data.sources import SourceSpec

    kind, sep, paths = text.partition(":")
    if not sep or not paths:
        raise ValueError(f"--source {text!r}: expected KIND:PATH[,PATH…], e.g. cc3m:/data/cc3m/*.tsv")
    return SourceSpec(kind, paths.split(","), url_column=args.url_column, caption_column=args.caption_column,
                      yfcc_metadata=args.yfcc_metadata)


def cmd_sources(args: argparse.Namespace) -> int:
    from pipelines.data.sources import build_url_list

    from pipelines.runtime import start_ray
    from pipelines.data.sources import check_url_list_out

    specs = [_source_spec(s, args) for s in args.source]
    check_url_list_out(Path(args.out), args.overwrite)  # before Ray starts
    start_ray(args.address, verbose=args.verbose)
    report = build_url_list(specs, args.out, seed=args.seed, rows_per_part=args.rows_per_part,
                            overwrite=args.overwrite)
    print(report.text())
    print(f"url list: {args.out} ({len(report.parts)} parquet part(s))")
    return 0


def _spec_from_args(args: argparse.Namespace):
    from pipelines.data.download import DownloadSpec

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    spec = DownloadSpec(image_size=args.image_size, number_sample_per_shard=args.per_shard,
                        processes_count=args.processes, thread_count=args.threads, timeout=args.timeout,
                        distributor=args.distributor, shard_retries=args.shard_retries,
                        shared_storage=args.shared_storage, options=options)
    if spec.distributor == "ray":
        from pipelines.runtime import start_ray

        start_ray(args.address, verbose=args.verbose)
    return spec


def cmd_download(args: argparse.Namespace) -> int:
    from pipelines.data.download import download

    spec = _spec_from_args(args)
    manifest = download(args.url_list, args.out, spec)
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=2))
    if args.track:
        from pipelines.tracking import log_manifest

        run_id = log_manifest(manifest, uri=args.track, params={"url_list": args.url_list, "output": args.out,
                                                                "image_size": spec.image_size})
        print(f"manifest logged to MLflow run {run_id} at {args.track}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pipelines.data.shard_sets import KeyMap, import_shards

    keys = KeyMap.parse(args.image_keys, args.caption)
    manifest = import_shards(args.source, args.out, keys, sample_shards=args.sample_shards, decode=args.decode,
                             overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=2))
    print(f"train on it: --set data.shards=[{Path(args.out).resolve()}] (with others to mix: data.weights)")
    return 0


def cmd_shapes(args: argparse.Namespace) -> int:
    from pipelines.data.shapes_world import ShapesWorld, download_world, write_train_images, write_voc_val

    out = Path(args.out)
    world = ShapesWorld(num_classes=args.classes, image_size=args.size, seed=args.seed)
    rows = write_train_images(world, out / "www", args.train)
    val = write_voc_val(world, out / "val", args.val)
    manifest = download_world(out / "www", rows, out / "urls", out / "shards", _spec_from_args(args), args.serve)
    print(f"shapes world: {manifest['samples']} training pairs in {manifest['num_shards']} shard(s) at "
          f"{out / 'shards'}, {args.val} validation images at {val}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipelines.data.download import read_manifest

    path = Path(args.path)
    if path.is_dir() or path.name.endswith(".json"):
        manifest = read_manifest(path)
        print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=2))
        for shard in manifest["shards"][: args.limit]:
            print(f"  {shard['tar']}: {shard['samples']} samples of {shard['attempted']}")
        return 0
    from pipelines.data.shard_view import first_samples

    try:
        view = first_samples(path, args.limit)
    except ValueError as exc:
        return user_error(exc)
    for sample in view.samples:
        members = ", ".join(f"{ext} {size} B" for ext, size in sample.members.items())
        print(f"{sample.key}: {sample.caption if sample.caption is not None else '<no caption>'!r} [{members}]")
    return user_error(view.damage) if view.damage else 0


def _download_options(p: argparse.ArgumentParser, image_size: int = 512) -> None:
    p.add_argument("--image-size", type=int, default=image_size, help="images resized to this side (pixels)")
    p.add_argument("--per-shard", type=int, default=10000, help="samples per shard")
    p.add_argument("--processes", type=int, default=2, help="download processes")
    p.add_argument("--threads", type=int, default=32, help="download threads per process")
    p.add_argument("--timeout", type=int, default=10, help="seconds to wait for one url")
    p.add_argument("--distributor", choices=["multiprocessing", "ray"], default="multiprocessing",
                   help="img2dataset's: processes on this machine, or one Ray task per shard on the cluster")
    p.add_argument("--shard-retries", type=int, default=2, help="tries again for a shard that failed")
    p.add_argument("--shared-storage", action="store_true", help="the output folder is a mount every node sees")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other img2dataset.download argument (repeatable)")
    add_ray_options(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="url lists, downloads into shards, the shapes world, shard inspection")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="STEP")
    p = dsub.add_parser("sources", help="url lists from CC3M/CC12M/RedCaps/YFCC14M/tables (Ray Data)")
    p.add_argument("--source", action="append", required=True, metavar="KIND:PATHS",
                   help="cc3m|cc12m|redcaps|yfcc14m|table and comma-separated files/globs (repeatable)")
    p.add_argument("--out", required=True, help="the url list folder (parquet parts and sources_report.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it holds files an earlier url list did not write")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    p.add_argument("--rows-per-part", type=int, default=1_000_000, help="rows per parquet part")
    p.add_argument("--url-column", default="url", help="url column of 'table' sources")
    p.add_argument("--caption-column", default="caption", help="caption column of 'table' sources")
    p.add_argument("--yfcc-metadata", action="append", default=[], metavar="PATH",
                   help="YFCC100M metadata file(s) for a yfcc14m source's ids (repeatable)")
    add_ray_options(p)
    p.set_defaults(func=cmd_sources)
    p = dsub.add_parser("download", help="url list → webdataset shards with img2dataset, plus a manifest")
    p.add_argument("url_list", help="a url list folder (from `pgseg data sources`) or a parquet/csv/tsv file")
    p.add_argument("out", help="the shard folder, or a folder URI such as s3://bucket/shards (credentials from the "
                               "environment); a run into the same place resumes: finished shards are kept")
    p.add_argument("--track", metavar="MLFLOW_URI", default=None,
                   help="log the manifest to MLflow (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)")
    _download_options(p)
    p.set_defaults(func=cmd_download)
    p = dsub.add_parser("import", help="a shard set downloaded elsewhere (img2dataset output, a webdataset mirror) "
                                       "checked by sampling and described by a manifest, to train on where it is")
    p.add_argument("source", help="its tars: a folder, a glob, or a folder URI (file://, s3://, gs://)")
    p.add_argument("--out", required=True, help="the folder for the manifest (the tars stay where they are)")
    p.add_argument("--image-keys", default=None, metavar="EXT[,EXT…]",
                   help="extensions that hold the image, first found wins (default jpg,jpeg,png,webp)")
    p.add_argument("--caption", default=None, metavar="EXT|json:FIELD",
                   help="where the caption is: an extension (default txt) or a field of the sample's JSON")
    p.add_argument("--sample-shards", type=int, default=8, help="tars read whole to check and count them")
    p.add_argument("--decode", type=int, default=16, help="images opened per tar read")
    p.add_argument("--overwrite", action="store_true", help="replace a manifest already in --out")
    p.set_defaults(func=cmd_import)
    p = dsub.add_parser("shapes", help="generate the shapes world, serve it on 127.0.0.1, download it into shards")
    p.add_argument("out", help="the world's folder: www/ (images), val/ (VOC layout), urls/, shards/")
    p.add_argument("--train", type=int, default=20000, help="training image-caption pairs")
    p.add_argument("--val", type=int, default=200, help="validation images with masks")
    p.add_argument("--classes", type=int, default=6, help="shape classes")
    p.add_argument("--size", type=int, default=64, help="image side (pixels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world")
    p.add_argument("--serve", choices=["http", "file"], default="http",
                   help="download over a loopback HTTP server or from file:// urls")
    _download_options(p, image_size=64)
    p.set_defaults(func=cmd_shapes)
    p = dsub.add_parser("inspect", help="show a manifest (folder or manifest.json) or a shard's samples (.tar)")
    p.add_argument("path", help="a shard folder, its manifest.json, or one .tar shard")
    p.add_argument("--limit", type=int, default=10, help="samples or shards shown")
    p.set_defaults(func=cmd_inspect)


def run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return user_error(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.data")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
