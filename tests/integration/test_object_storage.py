"""``s3://`` for real, against moto's S3 server on 127.0.0.1 (tests/s3_process.py): a shard set in a bucket is
imported where it is and read by Ray Data's workers through the session's Ray, every sample of it."""
from __future__ import annotations

import io
import json

import torch


def _mirror_into(uri: str, shards: int = 2, per_shard: int = 5) -> list[str]:
    """Webdataset tars as a mirror writes them (WebP, captions in a JSON field), uploaded under ``uri``."""
    import pyarrow.fs as pafs
    import webdataset as wds
    from PIL import Image

    fs, root = pafs.FileSystem.from_uri(uri)
    captions = []
    for s in range(shards):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as sink:
            for i in range(per_shard):
                picture = io.BytesIO()
                Image.new("RGB", (40, 30), (40 * i, 90, 60 * s)).save(picture, format="WEBP")
                captions.append(f"a photo kept in a bucket {s} {i}")
                sink.write({"__key__": f"{s}{i:03d}", "webp": picture.getvalue(),
                            "json": json.dumps({"caption": captions[-1]}).encode()})
        with fs.open_output_stream(f"{root}/part-{s:02d}.tar") as out:
            out.write(buf.getvalue())
    return captions


def test_a_shard_set_in_a_bucket_is_imported_and_read_by_ray_workers(ray_local, s3_server, tmp_path):
    from pgseg.text import tokenize
    from pipelines.data.ingest import Ingest
    from pipelines.data.shard_sets import KeyMap, import_shards

    bucket = s3_server.bucket("mirror-set")
    captions = _mirror_into(f"{bucket}/cc-mirror")
    manifest = import_shards(f"{bucket}/cc-mirror", tmp_path / "imported", KeyMap.parse("webp", "json:caption"))
    assert [s["tar"] for s in manifest["shards"]] == [f"{bucket}/cc-mirror/part-{s:02d}.tar" for s in range(2)]
    assert manifest["samples"] == len(captions) and manifest["counts"]["read"] == 2

    ingest = Ingest.from_paths([str(tmp_path / "imported")], img_size=32, context_length=16, seed=0)
    tokens = torch.cat([b["tokens"] for b in ingest.dataset(0).iter_torch_batches(batch_size=4, drop_last=False)])
    assert tokens.shape[0] == len(captions)  # each sample once, read from the bucket by Ray Data's tasks
    assert sorted(map(tuple, tokens.tolist())) == sorted(map(tuple, tokenize(captions, 16).tolist()))
    assert all(v == 0 for v in ingest.skips().values()), ingest.skips()


def test_the_s3_server_listens_on_loopback_only(s3_server):
    from listening import listening_addresses

    listeners = listening_addresses(int(s3_server.endpoint.rsplit(":", 1)[1]))
    assert listeners and all(a == "0100007F" for a in listeners), listeners  # 127.0.0.1
