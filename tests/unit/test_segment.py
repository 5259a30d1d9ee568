"""The zero-shot protocol (SPEC §6) on hand-made assignments and embeddings, and the metrics against brute force."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pgseg.metrics import ConfusionMatrix
from pgseg.segment import (ProtocolSettings, Segmenter, window_starts, clean_class_names, protocol_input, protocol_size,
                           read_image, sliding_logits, window_logits)

D = 4
CLASSES = torch.eye(D)  # class k's embedding: the k-th axis


class SignModel(torch.nn.Module):
    """Patch 2: stage 0 puts each patch in group 0 if its mean is positive, else group 1; stage 1 is the identity on
    those 2 groups; group 0's embedding is class 0's axis, group 1's is class 1's; the image looks like class 0
    and 1 equally, a little like class 2 and not at all like class 3."""

    model_cfg = None

    def __init__(self, group_vectors=None):
        super().__init__()
        self.group_vectors = group_vectors if group_vectors is not None else torch.eye(D)[:2]
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def itc_scale(self):
        return torch.tensor(10.0)

    def encode_image(self, crop):
        b, _, h, w = crop.shape
        means = F.avg_pool2d(crop.mean(dim=1, keepdim=True), 2).flatten(1)  # [B, N]
        soft0 = torch.stack([(means > 0).float(), (means <= 0).float()], dim=1)  # [B, 2, N]
        soft1 = torch.eye(2).expand(b, 2, 2)
        stages = [SimpleNamespace(assignment=SimpleNamespace(soft=soft0)),
                  SimpleNamespace(assignment=SimpleNamespace(soft=soft1))]
        pooled = torch.tensor([1.0, 1.0, 0.8, -1.0]).expand(b, D)
        return SimpleNamespace(x=pooled, groups=self.group_vectors.expand(b, -1, -1),
                               out=SimpleNamespace(stages=stages, grid=(h // 2, w // 2)))


def _image(h, w, split):
    img = -torch.ones(3, h, w)
    img[:, :, :split] = 1.0  # left part positive → group 0 → class 0
    return img


def _affinity(group_vector, chosen):
    """The release's group → class affinity for one group, by hand: its softmax over the chosen classes times its
    softmax over all classes (scale 10, as SignModel)."""
    logits = 10 * F.normalize(group_vector, dim=0) @ CLASSES.t()
    gated = torch.zeros(D)
    gated[chosen] = torch.softmax(logits[chosen], dim=0)
    return gated * torch.softmax(logits, dim=0)


def test_known_assignments_and_embeddings_give_known_labels():
    model = SignModel()
    out = window_logits(model, _image(8, 8, 4)[None], CLASSES, ProtocolSettings(window=8, stride=8, bg_thresh=None))
    labels = out[0].argmax(dim=0)
    assert (labels[:, :4] == 0).all() and (labels[:, 4:] == 1).all()
    # 4 classes ≤ top-5: every class is chosen, so a pixel's scores are its group's full softmax squared
    torch.testing.assert_close(out[0, :, 0, 0], _affinity(CLASSES[0], [0, 1, 2, 3]))
    torch.testing.assert_close(out[0, :, 0, 7], _affinity(CLASSES[1], [0, 1, 2, 3]))


def test_top_k_gating_is_each_groups_own_softmax_over_the_image_level_winners():
    model = SignModel(group_vectors=torch.stack([CLASSES[3], CLASSES[1]]))  # group 0 looks like class 3
    settings = ProtocolSettings(window=8, stride=8, bg_thresh=None, topk=3)  # image top-3: classes 0, 1, 2
    out = window_logits(model, _image(8, 8, 4)[None], CLASSES, settings)
    assert (out[0, 3] == 0).all()  # class 3 is gated out although group 0 matches it best
    assert (out[0].argmax(dim=0)[:, 4:] == 1).all()
    # group 0 sees classes 0, 1, 2 alike: its own softmax over them is 1/3 each, not the image's softmax
    torch.testing.assert_close(out[0, :, 0, 0], _affinity(CLASSES[3], [0, 1, 2]))
    torch.testing.assert_close(out[0, :3, 0, 0], torch.softmax(torch.tensor([0.0, 0, 0, 10]), 0)[:3] / 3)
    torch.testing.assert_close(out[0, :, 0, 7], _affinity(CLASSES[1], [0, 1, 2]))
    settings = ProtocolSettings(window=8, stride=8, bg_thresh=None, topk=4)
    out = window_logits(model, _image(8, 8, 4)[None], CLASSES, settings)
    assert (out[0, 3, :, :4] > 0).all()
    # True Label Guidance: the given classes replace the top-k set (here class 3 only: group 0 → class 3)
    out = window_logits(model, _image(8, 8, 4)[None], CLASSES, settings, torch.tensor([[False, False, False, True]]))
    torch.testing.assert_close(out[0, :, 0, 0], _affinity(CLASSES[3], [3]))
    assert (out[0, :3] == 0).all()


def test_background_is_one_where_the_best_score_is_strictly_under_the_clamped_threshold():
    weak = F.normalize(CLASSES[1] + 0.3 * CLASSES[2], dim=0)  # group 1: a weaker best class than group 0
    model = SignModel(group_vectors=torch.stack([CLASSES[0], weak]))
    best0, best1 = _affinity(CLASSES[0], [0, 1, 2, 3]).max(), _affinity(weak, [0, 1, 2, 3]).max()
    assert best1 < 0.999 < best0 < 1

    def background(thresh, image):
        out = window_logits(model, image[None], CLASSES, ProtocolSettings(window=8, stride=8, bg_thresh=thresh))[0]
        assert set(out[0].unique().tolist()) <= {0.0, 1.0}  # 0 or 1, not a threshold channel
        return out[0]

    half = _image(8, 8, 4)  # left: group 0, right: group 1
    assert (background(0.0, half) == 0).all()  # nothing is strictly below 0
    assert (background(0.9, half) == 0).all()  # both groups' best scores reach 0.9
    bg = background(0.999, half)
    assert (bg[:, :4] == 0).all() and (bg[:, 4:] == 1).all()  # only the weaker group falls under 0.999
    bg = background(1.0, half)  # clamped to the window's largest affinity: its own group stays (not strictly below)
    assert (bg[:, :4] == 0).all() and (bg[:, 4:] == 1).all()
    # the largest affinity counts even when its group has no pixel in the window: the whole window is background
    assert (background(1.0, _image(8, 8, 0)) == 1).all()
    assert (background(0.9, _image(8, 8, 0)) == 0).all()


def test_labels_take_the_lower_channel_on_an_exact_tie():
    both = F.normalize(CLASSES[0] + CLASSES[1], dim=0)  # group 0 likes classes 0 and 1 exactly alike
    seg = Segmenter.__new__(Segmenter)  # the stub has no text tower: give the class embeddings directly
    seg.model, seg.class_names, seg.classes = SignModel(torch.stack([both, CLASSES[2]])), list("abcd"), CLASSES
    seg.settings = ProtocolSettings(window=8, stride=8, short_side=8, bg_thresh=None)
    seg.names, seg.batch = seg.class_names, 8
    out = seg.segment(_image(8, 8, 8), (8, 8))
    assert out.probs[0].equal(out.probs[1]) and (out.labels == 0).all()
    torch.testing.assert_close(out.probs.sum(dim=0), torch.ones(8, 8))  # probabilities: softmax over channels


def test_the_releases_resize_rounds_8_bit_pixels_and_the_float_one_does_not():
    ramp = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)  # 1×2, upscaled ×2 → 2×4 (half-pixel centres)
    grey = {}
    for rule in ("uint8", "float"):
        settings = ProtocolSettings(window=4, stride=4, short_side=2, max_long_side=4, resize=rule)
        x = protocol_input(ramp, settings)
        assert x.shape == (3, 2, 4)
        grey[rule] = (x[0] * 0.229 + 0.485) * 255  # back to grey levels
    torch.testing.assert_close(grey["uint8"][0], torch.tensor([0.0, 64, 191, 255]), atol=1e-3, rtol=0)
    torch.testing.assert_close(grey["float"][0], torch.tensor([0.0, 63.75, 191.25, 255]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="8-bit RGB"):
        protocol_input(np.zeros((4, 4), np.float32), ProtocolSettings())
    with pytest.raises(ValueError, match="resize"):
        ProtocolSettings(resize="bicubic")


def test_sliding_windows_average_overlaps_and_labels_come_back_at_the_original_size():
    assert window_starts(20, 8, 4) == [0, 4, 8, 12] and window_starts(6, 8, 4) == [0] and window_starts(10, 8, 4) == [0, 2]
    model = SignModel()
    settings = ProtocolSettings(window=8, stride=4, short_side=16, bg_thresh=None)
    image = _image(16, 24, 10)
    logits = sliding_logits(model, image, CLASSES, settings)
    single = window_logits(model, image[None, :, :8, :8], CLASSES, settings)[0]
    assert logits.max() <= single.max() + 1e-6  # averaged, not summed (pixels here lie under up to 4 windows)
    assert torch.allclose(logits[:, :8, :8], single)
    labels = logits.argmax(dim=0)
    assert (labels[:, :10] == 0).all() and (labels[:, 10:] == 1).all()
    assert protocol_size(50, 100, ProtocolSettings(short_side=448)) == (448, 896)
    assert protocol_size(100, 4000, ProtocolSettings(short_side=448, max_long_side=2048)) == (51, 2048)


def test_segmenter_on_odd_sizes_and_image_modes(tmp_path):
    model = SignModel()
    seg = Segmenter.__new__(Segmenter)  # the stub has no text tower: give the class embeddings directly
    seg.model, seg.class_names, seg.classes = model, ["a", "b", "c", "d"], CLASSES
    seg.settings = ProtocolSettings(window=8, stride=4, short_side=8, bg_thresh=None)
    seg.names, seg.batch = seg.class_names, 8
    rgb = np.zeros((13, 29, 3), np.uint8)
    rgb[:, :9] = 255
    out = seg(Image.fromarray(rgb))
    assert out.labels.shape == (13, 29) and set(out.areas()) == {"a", "b"}
    # 16-bit grey, RGBA and EXIF-rotated files are read as RGB with the right size
    Image.fromarray((np.arange(12 * 7).reshape(12, 7) * 700).astype(np.uint16)).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png").size == (7, 12)
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    exif = Image.new("RGB", (6, 3)).getexif()
    exif[0x0112] = 6  # rotate 90°
    Image.new("RGB", (6, 3)).save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").size == (3, 6)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="empty"):
        clean_class_names(" , ")
    assert clean_class_names("cat, grass ,sky") == ["cat", "grass", "sky"]


def test_miou_equals_brute_force_per_class_counts():
    rng = np.random.default_rng(0)
    n = 5
    cm = ConfusionMatrix(n)
    inter, union, gt_count = np.zeros(n), np.zeros(n), np.zeros(n)
    for _ in range(6):
        target = rng.integers(0, n, (17, 23))
        target[rng.random((17, 23)) < 0.1] = 255
        pred = rng.integers(0, n, (17, 23))
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        valid = target != 255
        for c in range(n):
            p, t = (pred == c) & valid, (target == c) & valid
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
            gt_count[c] += t.sum()
    scores = cm.scores()
    assert np.allclose(scores.iou, inter / union)
    assert scores.miou == pytest.approx(float(np.mean(inter / union)))
    assert np.allclose(scores.accuracy, inter / gt_count)
    assert scores.aacc == pytest.approx(inter.sum() / gt_count.sum())
    with pytest.raises(ValueError, match=r"ids \[7, 9\]"):
        cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[7, 9, 255]]), source="x.png")


def test_a_class_absent_from_the_dataset_is_nan_and_left_out_unless_it_was_predicted():
    """mmseg's rule: a class in neither ground truth nor prediction has no IoU (nan, not in the mean); a class the
    model predicts but the dataset never shows has IoU 0 and pulls the mean down."""
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 0, 1, 3], [0, 2, 1, 2]])  # 2 and 3: absent from the ground truth, predicted once each
    cm = ConfusionMatrix(5, class_names=["bg", "a", "b", "c", "d"])  # d (4): absent from both
    cm.update(pred, target)
    scores = cm.scores()
    valid = target != 255
    expected = []
    for c in range(5):
        p, t = (pred == c) & valid, (target == c) & valid
        union = int((p | t).sum())
        expected.append(int((p & t).sum()) / union if union else float("nan"))
    assert np.allclose(scores.iou, expected, equal_nan=True)
    assert np.isnan(scores.iou[4]) and scores.iou[2] == scores.iou[3] == 0.0
    assert scores.miou == pytest.approx(np.mean(expected[:4]))  # d left out, b and c counted as 0
    assert np.isnan(scores.accuracy[2]) and np.isnan(scores.accuracy[4])  # no ground-truth pixel: no accuracy
    assert scores.macc == pytest.approx(np.mean([scores.accuracy[0], scores.accuracy[1]]))
    assert [row["class"] for row in scores.table()] == ["bg", "a", "b", "c", "d"]


def test_pgseg_segment_writes_masks_overlays_and_areas_and_skips_unreadable_files(tmp_path, capsys):
    import json

    from jobs.cli import main
    from pgseg.checkpoint import save_model
    from pgseg.config import load_config
    from pgseg.model import PGSeg

    config = load_config("tiny")
    save_model(PGSeg.from_config(config), config, tmp_path / "tiny.safetensors")
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "small.jpg")  # smaller than the 64-pixel window
    Image.fromarray((np.arange(70 * 50).reshape(50, 70) * 13).astype(np.uint16)).save(images / "sub" / "g16.png")
    Image.new("RGBA", (90, 64), (0, 0, 255, 128)).save(images / "rgba.png")
    (images / "broken.png").write_bytes(b"\x89PNG truncated")
    args = ["segment", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--classes", "circle, square, star",
            str(images), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err
    for stem, size in (("small", (40, 30)), ("sub/g16", (70, 50)), ("rgba", (90, 64))):
        mask = Image.open(tmp_path / "out" / f"{stem}_mask.png")
        assert mask.mode == "P" and mask.size == size
        assert np.asarray(mask).max() <= 3
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").height >= size[1]
        areas = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert areas["labels"] == ["background", "circle", "square", "star"]
        assert sum(areas["areas"].values()) == pytest.approx(1.0)
    assert not (tmp_path / "out" / "broken_mask.png").exists()
    assert main(["segment", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--classes", " , ",
                 str(images), "--out", str(tmp_path / "out2")]) == 2
    assert "empty" in capsys.readouterr().err


def test_the_background_threshold_in_force_is_the_first_one_set():
    from types import SimpleNamespace

    from pgseg.segment import background_threshold

    config = SimpleNamespace(bg_thresh=0.4)
    assert background_threshold(0.0, config, 0.95) == 0.0  # an explicit 0 is a choice, not "unset"
    assert background_threshold(None, config, 0.95) == 0.4
    assert background_threshold(None, SimpleNamespace(bg_thresh=None), 0.95) == 0.95
    assert background_threshold(None, SimpleNamespace(bg_thresh=None), None) is None  # a dataset without background


def test_several_images_together_give_what_each_gives_alone_large_ones_downscaled_and_labels_brought_back():
    from pgseg.segment import segment_image, segment_images

    seg = Segmenter.__new__(Segmenter)  # (as above: the stub model, class embeddings given)
    seg.model, seg.class_names, seg.classes = SignModel(), ["a", "b", "c", "d"], CLASSES
    seg.settings = ProtocolSettings(window=8, stride=4, short_side=8, bg_thresh=None)
    seg.names, seg.batch = seg.class_names, 8
    images = []
    for h, w, split in ((13, 29, 9), (40, 64, 20), (9, 9, 3)):
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[:, :split] = 255
        images.append(Image.fromarray(rgb))
    work_pixels = 1000  # the 40×64 one (2560 pixels) is segmented downscaled
    together = segment_images(seg, images, work_pixels)
    for image, (labels, result, work) in zip(images, together):
        alone_labels, alone, alone_work = segment_image(seg, image, work_pixels)
        assert labels.shape == (image.height, image.width)
        assert torch.equal(labels, alone_labels) and torch.equal(result.labels, alone.labels)
        assert work.size == alone_work.size and (work is image) == (image.width * image.height <= work_pixels)
    assert together[1][2].width * together[1][2].height <= work_pixels and len(np.unique(together[1][0])) == 2
