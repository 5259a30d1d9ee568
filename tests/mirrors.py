"""A shard set as public webdataset mirrors write it (WebP images, each caption in a field of the sample's JSON),
written by webdataset's own TarWriter into a folder or a folder URI (``s3://…``, through pyarrow)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.fs as pafs
import webdataset as wds
from PIL import Image


def write_mirror(where: str | Path, shards: int = 2, per_shard: int = 5, size: tuple[int, int] = (40, 30),
                 uncaptioned_last: bool = False) -> dict[str, list[str]]:
    """``shards`` tars ``part-NNN.tar``; with ``uncaptioned_last`` the last sample of each has no caption field.
    Returns each shard's captions (its usable samples), by shard name."""
    where = str(where)
    fs, root = pafs.FileSystem.from_uri(where) if "://" in where else (pafs.LocalFileSystem(), where)
    fs.create_dir(root, recursive=True)
    captions: dict[str, list[str]] = {}
    for s in range(shards):
        name, buf = f"part-{s:03d}", io.BytesIO()
        captions[name] = []
        with wds.TarWriter(buf) as sink:
            for i in range(per_shard):
                picture = io.BytesIO()
                Image.new("RGB", size, (40 * i % 256, 90, 60 * s % 256)).save(picture, format="WEBP")
                meta = {"width": size[0]}
                if not (uncaptioned_last and i == per_shard - 1):
                    meta["caption"] = f"a mirrored photo {s} {i}"
                    captions[name].append(meta["caption"])
                sink.write({"__key__": f"{s:03d}{i:04d}", "webp": picture.getvalue(),
                            "json": json.dumps(meta).encode()})
        with fs.open_output_stream(f"{root}/{name}.tar") as out:
            out.write(buf.getvalue())
    return captions
