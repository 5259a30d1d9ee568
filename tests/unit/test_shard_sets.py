"""`pgseg data import`: shard sets downloaded elsewhere, written by webdataset's own TarWriter as public mirrors write
them (WebP images, captions in a JSON field) or as img2dataset does (jpg + txt, a stats file per shard), checked by
sampling and described by our manifest; its key mapping turns their samples into ours."""
from __future__ import annotations

import io
import json

import pytest
import webdataset as wds
from PIL import Image

from mirrors import write_mirror

from pipelines.data.ingest import key_maps, shard_list
from pipelines.data.shard_sets import KeyMap, import_shards, mapped_samples


def _image(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (10 * i % 256, 80, 160)).save(buf, format=fmt)
    return buf.getvalue()


def _mirror(root, shards: int = 3, per_shard: int = 5) -> dict[str, list[str]]:
    """The last sample of each shard without a caption field; each shard's captions (the usable samples)."""
    return write_mirror(root, shards, per_shard, size=(24, 16), uncaptioned_last=True)


def test_a_mirror_with_json_captions_is_imported_and_read_as_ours(tmp_path):
    captions = _mirror(tmp_path / "mirror")
    out = tmp_path / "imported"
    with pytest.raises(ValueError) as refused:  # the default mapping (txt captions) finds none: the error says why
        import_shards(str(tmp_path / "mirror"), out)
    assert "json, webp" in str(refused.value) and "--caption json:caption" in str(refused.value)
    assert not out.exists()  # nothing half-written

    keys = KeyMap.parse("webp", "json:caption")
    manifest = import_shards(str(tmp_path / "mirror"), out, keys, sample_shards=2)
    assert manifest["num_shards"] == len(captions)
    assert manifest["counts"] == {"stats": 0, "read": 2, "estimated": len(captions) - 2}
    read = [s for s in manifest["shards"] if s["count"] == "read"]
    assert [s["samples"] for s in read] == [len(captions[s["shard"]]) for s in read]
    assert manifest["validation"]["samples_without_image_or_caption"] == 2  # one per shard read
    assert manifest["validation"]["images_undecodable"] == 0 and manifest["validation"]["images_opened"] > 0
    assert manifest["samples"] == sum(s["samples"] for s in manifest["shards"])

    tars = shard_list([str(out)])  # the tars where they are, through our manifest
    assert tars == sorted(str((tmp_path / "mirror" / f"{name}.tar").resolve()) for name in captions)
    mapping = key_maps([str(out)])
    assert len(mapping) == len(captions) and set(mapping.values()) == {keys}
    with open(tars[0], "rb") as stream:
        samples = list(mapped_samples(stream, tars[0], keys))
    got = [s["txt"].decode() for s in samples if "txt" in s]
    assert got == captions["part-000"]
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (24, 16) for s in samples)  # the image, under our key

    with pytest.raises(ValueError, match="exists"):  # the user's manifest is not replaced unasked
        import_shards(str(tmp_path / "mirror"), out, keys)
    assert import_shards(str(tmp_path / "mirror"), out, keys, overwrite=True, sample_shards=8)["counts"]["read"] == 3


def test_img2dataset_output_keeps_its_counts_and_a_broken_set_is_refused(tmp_path):
    root = tmp_path / "img2dataset"
    root.mkdir()
    counts = {}
    for s in range(3):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as sink:
            for i in range(4 + s):
                sink.write({"__key__": f"{s:05d}{i:04d}", "jpg": _image(i, "JPEG"), "txt": f"photo {s} {i}".encode()})
        counts[f"{s:05d}"] = 4 + s
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": 9, "successes": 4 + s}))
    manifest = import_shards(f"file://{root}", tmp_path / "m", sample_shards=1)
    assert manifest["counts"] == {"stats": 2, "read": 1, "estimated": 0}
    assert {s["shard"]: s["samples"] for s in manifest["shards"]} == counts
    assert all(s["tar"].startswith("file://") for s in manifest["shards"])
    assert key_maps([str(tmp_path / "m")]) == {}  # our own keys: nothing to map

    broken = tmp_path / "broken"
    broken.mkdir()
    with wds.TarWriter(str(broken / "00000.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"{i:04d}", "jpg": b"\xff\xd8 not a jpeg at all", "txt": b"a caption"})
    with pytest.raises(ValueError, match="4 of 4 sampled images do not decode"):
        import_shards(str(broken), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        import_shards(str(tmp_path / "m"), tmp_path / "c")


@pytest.mark.parametrize("image,caption,words", [("jp g", None, "--image-keys"), (None, "json:", "--caption"),
                                                 (None, "yaml:caption", "--caption"), (",", None, "--image-keys")])
def test_bad_key_mappings_are_named(image, caption, words):
    with pytest.raises(ValueError, match=words):
        KeyMap.parse(image, caption)


def test_the_command_says_what_is_wrong_with_exit_code_2(tmp_path, capsys):
    from jobs.data import main

    usable = _mirror(tmp_path / "mirror", shards=1)
    assert main(["import", str(tmp_path / "mirror"), "--out", str(tmp_path / "o")]) == 2
    assert "--caption json:caption" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "mirror"), "--out", str(tmp_path / "o"), "--image-keys", "webp",
                 "--caption", "json:caption"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["samples"] == len(usable["part-000"])
