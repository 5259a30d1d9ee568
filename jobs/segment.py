"""``pgseg segment --checkpoint CKPT --classes "cat, grass, sky" IMAGE_OR_FOLDER… --out DIR``: open-vocabulary
segmentation of any images with any class list. Per image: a palette mask PNG (pixel value = label id), an
overlay with a legend and a JSON of class areas. Unreadable files are reported and skipped."""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="a pgseg model file (.safetensors; see `pgseg convert`)")
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat, grass, sky"')
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bg-thresh", type=float, default=None,
                   help="background threshold (default: the model config's eval.bg_thresh, else 0.95)")
    p.add_argument("--no-background", action="store_true", help="every pixel gets one of the classes")
    p.add_argument("--device", default="cpu")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images with any list of class names")
    add_arguments(p)
    p.set_defaults(func=run)


def _inputs(paths: list[str]) -> list[Path]:
    from pgseg.segment import IMAGE_SUFFIXES

    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"no images in {paths}")
    return files


def run(args: argparse.Namespace) -> int:
    from pgseg.checkpoint import CheckpointError, load_model
    from pgseg.fileio import atomic_write_bytes, atomic_write_json
    from pgseg.segment import ProtocolSettings, Segmenter, clean_class_names, read_image
    from pgseg.visualize import overlay, palette_mask

    try:
        names = clean_class_names(args.classes)
        files = _inputs(args.inputs)
        model, config = load_model(args.checkpoint, args.device)
        e = config.eval
        bg = None if args.no_background else (args.bg_thresh if args.bg_thresh is not None else e.bg_thresh or 0.95)
        settings = ProtocolSettings.of(e, bg)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    segmenter = Segmenter(model, names, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done, failed, stems = 0, [], set()
    for path in files:
        try:
            image = read_image(path)
        except ValueError as exc:
            failed.append(str(path))
            print(f"skipped: {exc}", file=sys.stderr)
            continue
        result = segmenter(image)
        stem = path.stem if path.stem not in stems else f"{path.stem}_{len(stems)}"
        stems.add(stem)
        for suffix, picture in (("_mask.png", palette_mask(result.labels)),
                                ("_overlay.png", overlay(image, result.labels, result.names))):
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            atomic_write_bytes(out / f"{stem}{suffix}", buf.getvalue())
        atomic_write_json(out / f"{stem}.json", {"image": str(path), "width": image.width, "height": image.height,
                                                 "labels": result.names, "areas": result.areas()})
        done += 1
    print(f"segmented {done} image(s) into {out}" + (f"; skipped {len(failed)} unreadable: {failed}" if failed else ""))
    return 0 if done else 1


def main(argv: list[str] | None = None) -> int:
    from .runtime import entrypoint

    return entrypoint("python -m jobs.segment", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
