"""Zero-shot classification (ImageNet protocol): top-k counting, preprocessing, class-name files, and `pgseg eval
--classification` on Ray over a class-folder tree and over webdataset shards — both equal to an in-process count."""
from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image


def test_topk_correct_counts_rows_with_the_label_in_the_top_k():
    from pgseg.classify import topk_correct

    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.4, 0.45]])
    labels = torch.tensor([0, 2, 1, 1])
    assert topk_correct(logits, labels, ks=(1, 2, 5)) == {1: 1, 2: 3, 5: 4}
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        topk_correct(logits, torch.tensor([0, 1, 2, 3]))


def test_preprocess_resizes_the_short_side_then_crops_the_centre():
    from pgseg.classify import preprocess

    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # the centre third is white, the sides black
    x = preprocess(Image.fromarray(arr), 64)
    assert x.shape == (3, 64, 64)
    # short side 100 -> 73 (64·256/224), width 219; the centre crop of 64 lies inside the white band (73 wide)
    white = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[:, 32, 32], white, atol=0.05) and torch.allclose(x[:, 5, 5], white, atol=0.05)


def test_class_name_files(tmp_path):
    from pgseg.classify import read_class_names

    (tmp_path / "order.txt").write_text("tench\ngoldfish\n")
    (tmp_path / "map.txt").write_text("n02 goldfish\nn01 tench fish\n")
    assert read_class_names(tmp_path / "order.txt") == ["tench", "goldfish"]
    assert read_class_names(tmp_path / "map.txt", ["n01", "n02"]) == ["tench fish", "goldfish"]
    with pytest.raises(ValueError, match=r"no name for folder\(s\) \['n03'\]"):
        read_class_names(tmp_path / "map.txt", ["n01", "n02", "n03"])
    with pytest.raises(ValueError, match="2 names for 3 class folders"):
        read_class_names(tmp_path / "order.txt", ["a", "b", "c"])


@pytest.fixture(scope="module")
def single_shapes(tmp_path_factory):
    """Single-object shapes-world images as a class-folder tree and as one webdataset shard (jpg + cls)."""
    from pipelines.data.shapes_world import ShapesWorld

    root = tmp_path_factory.mktemp("classify")
    world = ShapesWorld(num_classes=4, image_size=64, max_objects=1, seed=5)
    tar_path = root / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(24):
            sample = world.sample("val", i)
            label = world.classes.index(sample.names[0])
            buf = io.BytesIO()
            sample.image.save(buf, format="JPEG", quality=95)
            folder = root / "tree" / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.jpg").write_bytes(buf.getvalue())
            for ext, data in (("jpg", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    folders = sorted(p.name for p in (root / "tree").iterdir())
    (root / "names.txt").write_text("".join(f"c{k} {world.classes[k]}\n" for k in range(4) if f"c{k}" in folders))
    (root / "ordered.txt").write_text("".join(f"{c}\n" for c in world.classes))
    return {"root": root, "tree": root / "tree", "tar": tar_path, "world": world, "folders": folders}


def _expected(model_path, samples, names) -> tuple[float, float]:
    from pgseg.checkpoint import load_model
    from pgseg.classify import ZeroShotClassifier, load_image, topk_correct

    model, _ = load_model(model_path)
    classifier = ZeroShotClassifier(model, names)
    images = torch.stack([load_image(str(p), classifier.size) for p, _ in samples])
    hits = topk_correct(classifier(images), torch.tensor([label for _, label in samples]))
    return hits[1] / len(samples), hits[5] / len(samples)


def test_eval_classification_on_a_folder_tree_and_on_shards(ray_local, trained_tiny, single_shapes, capsys):
    from jobs.evaluate import main
    from pgseg.classify import folder_samples

    tree, world = single_shapes["tree"], single_shapes["world"]
    folders, samples = folder_samples(tree)
    names = [world.classes[int(f[1:])] for f in folders]
    top1, top5 = _expected(trained_tiny, samples, names)
    rc = main(["--checkpoint", str(trained_tiny), "--classification", str(tree), "--class-names",
               str(single_shapes["root"] / "names.txt"), "--no-track"])
    out = capsys.readouterr().out
    assert rc == 0
    found = re.search(r"top-1 ([0-9.]+)\s+top-5 ([0-9.]+)\s+\((\d+) images, (\d+) classes\)", out)
    assert float(found.group(1)) == pytest.approx(round(100 * top1, 2))
    assert float(found.group(2)) == pytest.approx(round(100 * top5, 2))
    assert int(found.group(3)) == 24 and int(found.group(4)) == len(folders)
    if len(folders) == 4:  # the shard's labels index the world's classes: same images, same names, same figures
        rc = main(["--checkpoint", str(trained_tiny), "--classification", str(single_shapes["tar"]),
                   "--class-names", str(single_shapes["root"] / "ordered.txt"), "--no-track"])
        shard = re.search(r"top-1 ([0-9.]+)\s+top-5 ([0-9.]+)", capsys.readouterr().out)
        assert rc == 0 and (shard.group(1), shard.group(2)) == (found.group(1), found.group(2))


def test_eval_classification_names_a_bad_label(ray_local, trained_tiny, single_shapes, tmp_path, capsys):
    from jobs.evaluate import main

    bad = tmp_path / "bad.tar"
    with tarfile.open(single_shapes["tar"]) as src, tarfile.open(bad, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name == "000003.cls":
                data = b"9"
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    rc = main(["--checkpoint", str(trained_tiny), "--classification", str(bad), "--class-names",
               str(single_shapes["root"] / "ordered.txt"), "--no-track"])
    err = capsys.readouterr().err
    assert rc == 2 and "sample 000003: label 9 is outside 0..3" in err
    cut = tmp_path / "cut.tar"
    data = single_shapes["tar"].read_bytes()
    with tarfile.open(single_shapes["tar"]) as src:
        members = src.getmembers()
    cut.write_bytes(data[: members[6].offset + 100])  # inside the header of the fourth sample's image
    rc = main(["--checkpoint", str(trained_tiny), "--classification", str(cut), "--class-names",
               str(single_shapes["root"] / "ordered.txt"), "--no-track"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{cut}: damaged_tar (after its last good sample)" in err
