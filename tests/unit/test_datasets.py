"""Each dataset reader on a small tree in that dataset's real layout, written here."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pgseg import datasets
from pipelines.data.shapes_world import VOC_PALETTE


def _jpg(path, h=6, w=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (120, 30, 60)).save(path)


def _palette_png(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), "P")
    im.putpalette(VOC_PALETTE)
    im.save(path)


def _ids(seed, high, shape=(6, 8)):
    ids = np.random.default_rng(seed).integers(0, high, shape)
    ids[0, 0] = 255
    return ids


def test_voc_reads_palette_masks_by_the_split_list(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000042\n")
    for i, name in enumerate(["2007_000033", "2007_000042", "2007_999999"]):
        _jpg(root / "JPEGImages" / f"{name}.jpg")
        _palette_png(root / "SegmentationClass" / f"{name}.png", _ids(i, 21))
    ds = datasets.voc(root)
    assert [s.id for s in ds] == ["2007_000033", "2007_000042"] and ds.bg_thresh == 0.95
    assert ds.class_names[0] == "background" and ds.class_names[-1] == "monitor" and len(ds.class_names) == 21
    assert (ds.read_mask(ds.samples[1]) == _ids(1, 21)).all()  # palette indices, not colours
    _palette_png(root / "SegmentationClass" / "2007_000033.png", np.full((6, 8), 40))
    with pytest.raises(ValueError, match=r"2007_000033.png: label ids \[40\]"):
        ds.read_mask(ds.samples[0])
    (root / "JPEGImages" / "2007_000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        datasets.voc(root)


def test_context_reads_its_own_split_and_60_classes(tmp_path):
    root = tmp_path / "VOC2010"
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    _jpg(root / "JPEGImages" / "2008_000002.jpg")
    (root / "SegmentationClassContext").mkdir()
    Image.fromarray(_ids(3, 60).astype(np.uint8), "L").save(root / "SegmentationClassContext" / "2008_000002.png")
    ds = datasets.context(root)
    assert len(ds.class_names) == 60 and ds.bg_thresh == 0.36
    assert (ds.read_mask(ds.samples[0]) == _ids(3, 60)).all()


def test_coco_stuff_to_coco_object_conversion_and_reader(tmp_path):
    # value = category id − 1: 0 = person (id 1) → 1; 11 = id 12, unused by COCO → 0; 12 = stop sign (id 13);
    # 90 = id 91 and 91, 181 = stuff → 0; 255 unlabelled → 0; 89 = toothbrush (id 90) → 80
    stuff = np.array([[0, 11, 12, 90], [91, 181, 255, 89]], np.uint8)
    converted = datasets.coco_stuff_to_object(stuff)
    expected = np.array([[1, 0, datasets.COCO_THING_IDS.index(13) + 1, 0], [0, 0, 0, 80]])
    assert (converted == expected).all()
    assert datasets.COCO_OBJECT_CLASSES[datasets.COCO_THING_IDS.index(13) + 1] == "stop sign"
    assert datasets.COCO_OBJECT_CLASSES[80] == "toothbrush" and len(datasets.COCO_OBJECT_CLASSES) == 81
    root = tmp_path / "coco"
    (root / "stuff").mkdir(parents=True)
    Image.fromarray(stuff, "L").save(root / "stuff" / "000000000139.png")
    _jpg(root / "images" / "val2017" / "000000000139.jpg", 2, 4)
    assert datasets.convert_coco_stuff(root / "stuff", root / "annotations" / "val2017") == 1
    ds = datasets.coco_object(root)
    assert ds.bg_thresh == 0.85 and [s.id for s in ds] == ["000000000139"]
    assert (ds.read_mask(ds.samples[0]) == expected).all()


def test_imagenet_s_reads_rgb_encoded_ids_and_its_category_file(tmp_path):
    root = tmp_path / "ImageNetS919"
    root.mkdir()
    (root / "ImageNetS_categories_im919.txt").write_text("n01443537 goldfish\nn01484850 great white shark\n")
    _jpg(root / "validation" / "n01443537" / "ILSVRC2012_val_00000001.JPEG")
    ids = np.array([[0, 1, 2], [1000, 2, 0]])
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)
    (root / "validation-segmentation" / "n01443537").mkdir(parents=True)
    Image.fromarray(rgb, "RGB").save(root / "validation-segmentation" / "n01443537" / "ILSVRC2012_val_00000001.png")
    ds = datasets.imagenet_s(root)
    assert ds.class_names == ["background", "goldfish", "great white shark"] and ds.bg_thresh == 0.11
    assert (ds.read_mask(ds.samples[0]) == np.array([[0, 1, 2], [255, 2, 0]])).all()


def test_lvis_and_folder_readers(tmp_path):
    root = tmp_path / "lvis"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "lvis_v1_val.json").write_text(json.dumps(
        {"categories": [{"id": 2, "name": "aerosol_can"}, {"id": 1, "name": "acorn"}]}))
    _jpg(root / "images" / "val" / "000000000001.jpg", 2, 2)
    (root / "masks" / "val").mkdir(parents=True)
    Image.fromarray(np.array([[0, 1], [2, 0]], np.uint8), "L").save(root / "masks" / "val" / "000000000001.png")
    ds = datasets.lvis(root)
    assert ds.class_names == ["background", "acorn", "aerosol can"] and ds.bg_thresh == 0.35
    folder = tmp_path / "mine"
    (folder / "masks").mkdir(parents=True)
    (folder / "classes.txt").write_text("background\ncat\ngrass\n")
    _jpg(folder / "images" / "a.png", 2, 2)
    Image.fromarray(np.array([[0, 1], [2, 7]], np.uint8), "L").save(folder / "masks" / "a.png")
    ds = datasets.open_dataset(f"folder:{folder}")
    assert ds.class_names == ["background", "cat", "grass"] and ds.bg_thresh == 0.95
    with pytest.raises(ValueError, match=r"a.png: label ids \[7\]"):
        ds.read_mask(ds.samples[0])
    with pytest.raises(ValueError, match="KIND:ROOT"):
        datasets.open_dataset("pascal:/nowhere")
