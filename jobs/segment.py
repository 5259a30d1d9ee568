"""``pgseg segment --checkpoint CKPT --classes "cat, grass, sky" IMAGE_OR_FOLDER… --out DIR``: open-vocabulary
segmentation of any images with any class list. Per image: a palette mask PNG (pixel value = label id), an
overlay with a legend and a JSON of class areas, named after the image's path relative to the inputs (so two
``x.png`` in different folders do not collide). Unreadable or over-limit files are reported and skipped. Results
that already exist stop the run before it starts unless ``--overwrite`` (replace them) or ``--resume`` (keep them,
segment the rest)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .runtime import user_error

SUFFIXES = ("_mask.png", "_overlay.png", ".json")  # the results of one image


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pgseg.device import DEVICE_HELP
    from pgseg.limits import MAX_BYTES, MAX_PIXELS, WORK_PIXELS

    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively; the output folder is "
                                             "never searched)")
    p.add_argument("--checkpoint", required=True, help="a pgseg model file (.safetensors; see `pgseg convert`)")
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat, grass, sky"')
    p.add_argument("--out", required=True, help="output folder (made if missing)")
    p.add_argument("--bg-thresh", type=float, default=None,
                   help="background threshold in [0, 1] (default: the model config's eval.bg_thresh, else 0.95)")
    p.add_argument("--no-background", action="store_true",
                   help="no background label: every pixel gets one of the classes (mask values 0-based)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--max-pixels", type=float, default=MAX_PIXELS,
                   help="skip images with more pixels than this (checked before decoding)")
    p.add_argument("--max-bytes", type=float, default=MAX_BYTES, help="skip files larger than this")
    p.add_argument("--work-pixels", type=float, default=WORK_PIXELS,
                   help="segment larger images downscaled to this many pixels (bounded memory); results keep "
                        "the image's size")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace results that already exist")
    group.add_argument("--resume", action="store_true", help="keep results that already exist, segment the rest")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images with any list of class names",
                       description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def plan_outputs(paths: list[str], out: Path) -> list[tuple[Path, Path]]:
    """(image, result base path without suffix) for every image in ``paths``: folders searched recursively except
    ``out``; names relative to the inputs' common folder, the file's suffix kept where two images would share a
    name (``x.png`` and ``x.jpg``)."""
    from pgseg.limits import IMAGE_SUFFIXES

    out = out.resolve()
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and out not in p.resolve().parents)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    files = list(dict.fromkeys(p.resolve() for p in files))  # each image once
    if not files:
        raise FileNotFoundError(f"no images in {paths} (searched for {', '.join(IMAGE_SUFFIXES)})")
    root = Path(os.path.commonpath([p.parent for p in files]))
    stems = [p.relative_to(root).with_suffix("") for p in files]
    shared = {s for s in stems if stems.count(s) > 1}
    return [(p, out / (s.parent / p.name if s in shared else s)) for p, s in zip(files, stems)]


def run(args: argparse.Namespace) -> int:
    from pgseg.checkpoint import CheckpointError, load_model
    from pgseg.device import resolve_device
    from pgseg.fileio import writable_folder
    from pgseg.segment import ProtocolSettings, Segmenter, background_threshold, clean_class_names

    out = Path(args.out)
    try:
        names = clean_class_names(args.classes)
        for flag in ("max_pixels", "max_bytes", "work_pixels"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag):g}")
        plan = plan_outputs(args.inputs, out)
        done = [(image, base) for image, base in plan if any(base.with_name(base.name + s).exists() for s in SUFFIXES)]
        if done and not (args.overwrite or args.resume):
            raise ValueError(f"{len(done)} of {len(plan)} image(s) already have results in {out} (e.g. "
                             f"{done[0][1].name}*): add --overwrite to replace them or --resume to keep them")
        model, config = load_model(args.checkpoint, resolve_device(args.device))
        e = config.eval
        settings = ProtocolSettings.of(e, None if args.no_background else background_threshold(args.bg_thresh, e))
        writable_folder(out, "--out")  # last: a bad option leaves no folder behind
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        return user_error(exc)
    if args.resume:
        plan = [item for item in plan if not all(item[1].with_name(item[1].name + s).exists() for s in SUFFIXES)]
    return _segment_all(Segmenter(model, names, settings), plan, out, args)


def _segment_all(segmenter, plan: list[tuple[Path, Path]], out: Path, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pgseg.fileio import atomic_write_bytes, atomic_write_json
    from pgseg.segment import label_areas, read_image, segment_image
    from pgseg.visualize import overlay, palette_mask, png_bytes

    done, failed, scaled, background = 0, [], 0, 0
    for path, base in tqdm(plan, desc="segment", unit="image", disable=None, file=sys.stderr):
        try:
            image = read_image(path, int(args.max_pixels), int(args.max_bytes))
        except ValueError as exc:
            failed.append(str(path))
            tqdm.write(f"skipped: {exc}", file=sys.stderr)
            continue
        labels, result, work = segment_image(segmenter, image, int(args.work_pixels))
        scaled += work is not image
        areas = label_areas(labels, result.names)
        background += set(areas) == {"background"}
        for suffix, picture in (("_mask.png", palette_mask(labels)),  # the overlay at the size segmented
                                ("_overlay.png", overlay(work, result.labels, result.names))):
            atomic_write_bytes(base.with_name(base.name + suffix), png_bytes(picture))
        record = {"image": str(path), "width": image.width, "height": image.height, "labels": result.names,
                  "areas": areas}
        if work is not image:
            record["segmented_at"] = [work.width, work.height]  # (and its overlay drawn at)
        atomic_write_json(base.with_name(base.name + ".json"), record)
        done += 1
    print(f"segmented {done} image(s) into {out}" + (f"; skipped {len(failed)} unreadable or over the limits: "
                                                      f"{failed}" if failed else ""))
    if scaled:
        print(f"{scaled} image(s) over {args.work_pixels / 1e6:g} Mpx were segmented downscaled (labels upscaled to "
              f"the image's size; 'segmented_at' in their JSON)")
    if done and background == done:
        print("hint: every image came out background only: the model may be untrained (random weights), or the "
              "threshold too high for it; try a lower --bg-thresh or --no-background", file=sys.stderr)
    return 0 if done or not plan else 1


def main(argv: list[str] | None = None) -> int:
    from .runtime import entrypoint

    return entrypoint("python -m jobs.segment", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
