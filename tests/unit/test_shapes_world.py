import hashlib

import numpy as np
import pytest
from PIL import Image

from pipelines.data.shapes_world import ShapesWorld, write_train_images, write_voc_val


def _colour_pixels(image: Image.Image, background: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background layer (the drawn shapes)."""
    return (np.abs(np.asarray(image).astype(int) - background.astype(int)).sum(-1) > 0)


def test_masks_match_the_drawn_shapes_pixel_for_pixel():
    world = ShapesWorld(seed=3)
    for i in range(40):
        sample = world.sample("val", i)
        # the pixels the shapes changed are exactly the mask's foreground, and each carries its shape's class
        assert np.array_equal(_colour_pixels(sample.image, sample.background), sample.mask > 0), i
        assert set(np.unique(sample.mask)) - {0} == {world.classes.index(n) + 1 for n in sample.names}
        assert sample.mask.shape == (64, 64) and sample.mask.max() <= len(world.classes)


def test_captions_name_exactly_the_visible_classes():
    world = ShapesWorld(seed=1)
    for i in range(60):
        sample = world.sample("train", i)
        mask, caption = sample.mask, world.caption("train", i, sample.names)
        mentioned = {c for c in world.classes if c in caption}
        visible = {world.classes[v - 1] for v in np.unique(mask) if v > 0}
        assert mentioned == visible, (caption, visible)


def test_same_seed_same_bytes_and_voc_layout(tmp_path):
    world = ShapesWorld(seed=5)
    a = write_voc_val(world, tmp_path / "a", 8)
    b = write_voc_val(ShapesWorld(seed=5), tmp_path / "b", 8)
    c = write_voc_val(ShapesWorld(seed=6), tmp_path / "c", 8)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digest(a) == digest(b) and digest(a) != digest(c)
    ids = (a / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(ids) == 8 and (a / "class_names.txt").read_text().split()[0] == "background"
    png = Image.open(a / "SegmentationClass" / f"{ids[0]}.png")
    assert png.mode == "P" and png.size == (64, 64)
    assert np.array_equal(np.asarray(png), world.sample("val", 0).mask)
    rows = write_train_images(world, tmp_path / "train", 5)
    assert [r["path"] for r in rows] == [f"images/{i:08d}.jpg" for i in range(5)]
    assert all((tmp_path / "train" / r["path"]).is_file() and r["caption"] for r in rows)


@pytest.mark.parametrize("kwargs, message", [({"num_classes": 0}, "num_classes"), ({"num_classes": 99}, "num_classes"),
                                             ({"min_objects": 3, "max_objects": 2}, "min_objects"),
                                             ({"max_radius": 0.6}, "max_radius"), ({"colour_tie": 2}, "colour_tie")])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesWorld(**kwargs)


def test_voc_palette_is_the_standard_one():
    from pipelines.data.shapes_world import VOC_PALETTE

    colour = {i: tuple(VOC_PALETTE[3 * i:3 * i + 3]) for i in range(256)}
    assert colour[0] == (0, 0, 0) and colour[1] == (128, 0, 0) and colour[15] == (192, 128, 128)  # person
    assert colour[20] == (0, 64, 128) and len(set(colour.values())) == 256  # tvmonitor; all distinct
