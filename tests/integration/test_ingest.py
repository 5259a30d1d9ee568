"""Ingest on real tar shards with injected corruption, through Ray Data on a local Ray cluster."""
import io
import tarfile

import pytest
import torch

from pipelines.data.ingest import Ingest, pass_shards, shard_list
from pipelines.data.shapes_world import ShapesWorld


def _jpeg(world, i):
    buf = io.BytesIO()
    world.sample("train", i).image.save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    world = ShapesWorld(seed=4, image_size=48)
    good = []
    for i in range(10):
        good += [(f"{i:04d}.jpg", _jpeg(world, i)), (f"{i:04d}.txt", f"a photo of shape {i}".encode())]
    _write_tar(root / "00000.tar", good)
    corrupt = [("0100.jpg", b"\xff\xd8 this is not a jpeg"), ("0100.txt", b"bad bytes"),   # bad image
               ("0101.jpg", _jpeg(world, 11)),                                                # no caption
               ("0102.txt", b"a caption without an image"),                                   # no image
               ("0103.png", _png(world, 12)), ("0103.txt", b"a png sample"),                  # good (png)
               ("0104.jpg", _jpeg(world, 13)), ("0104.txt", b"   ")]                          # blank caption
    _write_tar(root / "00001.tar", corrupt)
    full = root / "full.tar"  # 8 captioned samples, cut twice: inside sample 5's image data, at sample 3's header
    _write_tar(full, [m for i in range(8) for m in ((f"{i:04d}.jpg", _jpeg(world, 20 + i)), (f"{i:04d}.txt", b"x"))])
    data = full.read_bytes()
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    (root / "00002.tar").write_bytes(data[: members[10].offset_data + 100])
    (root / "00003.tar").write_bytes(data[: members[6].offset])
    full.unlink()
    return root


def _png(world, i):
    buf = io.BytesIO()
    world.sample("train", i).image.save(buf, format="PNG")
    return buf.getvalue()


def test_batches_shapes_dtypes_and_exact_skip_counts(ray_local, shards):
    ingest = Ingest.from_paths([str(shards / "*.tar")], img_size=32, context_length=16, seed=0)
    batches = list(ingest.dataset(0).iter_torch_batches(batch_size=4, drop_last=False))
    images = torch.cat([b["image"] for b in batches])
    tokens = torch.cat([b["tokens"] for b in batches])
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
    assert tokens.dtype == torch.int64 and tokens.shape[1] == 16
    assert images.shape[0] == tokens.shape[0] == 10 + 1 + 5 + 3  # good, the png, the complete ones before each cut
    assert (tokens[:, 0] == 49406).all()  # every row starts with SOT
    assert abs(images.mean().item()) < 2 and images.std().item() > 0.1  # ImageNet-normalised
    skips = ingest.skips()
    assert skips == {"bad_image": 1, "no_caption": 2, "no_image": 1, "damaged_tar": 2, "repeated_key": 0}


def test_through_ray_data_every_complete_sample_comes_once_and_each_break_once(ray_local, shards):
    import ray

    from pipelines.data.ingest import TarShards

    rows = ray.data.read_datasource(TarShards(shard_list([str(shards / "*.tar")]))).to_pandas()
    samples = rows[rows["__error__"].isna()]
    assert not samples.duplicated(["__url__", "__key__"]).any()
    assert samples.groupby(samples["__url__"].str[-9:]).size().to_dict() == {
        "00000.tar": 10, "00001.tar": 5, "00002.tar": 5, "00003.tar": 3}
    assert sorted(rows.loc[rows["__error__"].notna(), "__url__"].str[-9:]) == ["00002.tar", "00003.tar"]


def test_each_pass_has_its_own_shard_order_and_reads_every_shard():
    a = [f"a{i}.tar" for i in range(10)]
    orders = [pass_shards([a], None, p, seed=1) for p in range(3)]
    assert orders[0] == pass_shards([a], None, 0, seed=1)  # drawn from (seed, pass) alone
    assert orders[0] != pass_shards([a], None, 0, seed=2)
    assert len({tuple(o) for o in orders}) == 3  # three passes, three orders
    assert all(sorted(o) == sorted(a) for o in orders)  # each pass reads every shard once


def test_weighted_mixing_reads_each_source_in_its_share_and_every_shard_of_it():
    """Source a (12 shards, weight 3) and b (4 shards, weight 1): 16 shards a pass, 12 from a and 4 from b; over 10
    passes a's shards are each read 10 times and b's 10 times (each source walks through seeded permutations of its
    shards). With weights 1:1, b (4 shards) gives 8 a pass: its shards come twice a pass, a's 12 take turns."""
    from collections import Counter

    a = [f"a{i}.tar" for i in range(12)]
    b = [f"b{i}.tar" for i in range(4)]
    passes = [pass_shards([a, b], [3.0, 1.0], p, seed=0) for p in range(10)]
    assert all(len(o) == 16 and sum(s.startswith("a") for s in o) == 12 for o in passes)
    assert Counter(s for o in passes for s in o) == Counter({s: 10 for s in a + b})
    even = [pass_shards([a, b], [1.0, 1.0], p, seed=0) for p in range(3)]
    reads = Counter(s for o in even for s in o)
    assert all(sum(s.startswith("b") for s in o) == 8 for o in even)
    assert {reads[s] for s in b} == {6} and {reads[s] for s in a} == {2}  # 3 passes × 8 = 24 = 12 × 2
    assert len({tuple(o) for o in even}) == 3


def test_epoch_size_from_the_manifest(tmp_path):
    from pipelines.data.download import write_manifest
    from pipelines.data.ingest import manifest_samples

    write_manifest(tmp_path, {"shards": [{"tar": "00000.tar", "samples": 7, "attempted": 9}], "samples": 7})
    (tmp_path / "00000.tar").write_bytes(b"")
    assert manifest_samples([str(tmp_path)]) == 7 and shard_list([str(tmp_path)]) == [str(tmp_path / "00000.tar")]
    assert manifest_samples([str(tmp_path / "*.tar")]) is None


def test_missing_shards_are_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        shard_list([str(tmp_path / "*.tar")])


def test_noun_prompts_for_the_multi_label_loss_and_seeded_augmentation(ray_local, shapes_data):
    from pgseg.text import tokenize

    def run():
        ingest = Ingest.from_paths([str(shapes_data["shards"])], img_size=32, context_length=16, seed=3,
                                   multi_label=2, deterministic=True)
        ds = ingest.dataset(0).limit(64)
        return ds.take_batch(64, batch_format="numpy")

    a, b = run(), run()
    assert a["nouns"].shape == (64, 2, 16) and a["nouns"].dtype == a["tokens"].dtype
    assert (a["nouns"][:, :, 0] == 49406).all()
    # every shapes-world caption names a shape: its prompts carry that noun's tokens, not just the caption again
    shape_tokens = {int(tokenize([n], 16)[0, 1]) for n in shapes_data["world"].classes}
    assert all(shape_tokens & set(row.ravel().tolist()) for row in a["nouns"])
    # each prompt's noun id: a shape's id where the prompt names it, -1 where the caption stands in for a noun
    from pgseg.text import NounVocabulary, noun_id

    ids = {noun_id(n): n for n in NounVocabulary.from_file().nouns}  # the built-in vocabulary (no file given)
    assert a["noun_ids"].shape == (64, 2) and set(a["noun_ids"].ravel().tolist()) <= {*ids, -1}
    caption_rows = a["tokens"][:, None, :].repeat(2, axis=1)
    assert ((a["noun_ids"] == -1) == (a["nouns"] == caption_rows).all(axis=-1)).all()
    for row_ids, row_tokens in zip(a["noun_ids"], a["nouns"]):
        for i, toks in zip(row_ids, row_tokens):
            if i != -1:
                assert int(tokenize([ids[int(i)]], 16)[0, 1]) in toks.tolist()
    # deterministic: the same crops and prompts on a second read
    assert (a["image"] == b["image"]).all() and (a["nouns"] == b["nouns"]).all()


def test_deterministic_augmentation_follows_the_pass(shapes_data):
    """The same samples, seeded: the same crops, flips and noun prompts within a pass, new ones in the next pass."""
    from pipelines.data.ingest import Preprocess
    from pipelines.data.tar_reader import tar_samples
    import pandas as pd

    tar = sorted(shapes_data["shards"].glob("*.tar"))[0]
    with open(tar, "rb") as stream:
        rows = pd.DataFrame.from_records([s for s, _ in zip(tar_samples(stream, str(tar)), range(16))])

    def augmented(pass_index):
        udf = Preprocess(48, 16, 0.3, counter=None, multi_label=2, seed=(3, pass_index))
        return udf(rows)

    first, again, second = augmented(0), augmented(0), augmented(1)
    assert first["image"].shape == (16, 3, 48, 48)
    assert (first["image"] == again["image"]).all() and (first["nouns"] == again["nouns"]).all()
    assert (first["tokens"] == second["tokens"]).all()  # the same captions
    differ = [(first["image"][i] != second["image"][i]).any() for i in range(16)]
    assert sum(differ) >= 12 and (first["nouns"] != second["nouns"]).any()


def test_an_imported_shard_set_trains_beside_our_own_shards(ray_local, shapes_data, tmp_path):
    """A mirror's shards (WebP, captions in a JSON field), imported with their key mapping, read through Ray Data
    together with the shapes world's downloaded shards: every usable sample of both, none skipped, the mirror's
    captions tokenised as ours."""
    import json

    from mirrors import write_mirror

    from pgseg.text import tokenize
    from pipelines.data.shard_sets import KeyMap, import_shards

    mirror = tmp_path / "mirror"
    captions = [c for shard in write_mirror(mirror, shards=2, per_shard=6).values() for c in shard]
    imported = tmp_path / "imported"
    import_shards(str(mirror), imported, KeyMap.parse("webp", "json:caption"))
    ingest = Ingest.from_paths([str(imported), str(shapes_data["shards"])], img_size=32, context_length=16, seed=0)
    tokens = torch.cat([b["tokens"] for b in ingest.dataset(0).iter_torch_batches(batch_size=64, drop_last=False)])
    assert tokens.shape[0] == len(captions) + json.loads((shapes_data["shards"] / "manifest.json").read_text())["samples"]
    assert all(v == 0 for v in ingest.skips().values()), ingest.skips()
    rows = {tuple(r) for r in tokens.tolist()}
    assert all(tuple(r) in rows for r in tokenize(captions, 16).tolist())
