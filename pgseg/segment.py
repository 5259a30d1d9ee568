"""Zero-shot segmentation with the published protocol (SPEC §6), on any image and any list of class names, label for
label as the released code computes it (checked against ``released_fixture/segmentation.pt``).

1. class embeddings: prompts → text encoder → projector → mean over templates → L2-normalise;
2. the 8-bit image resized (short side 448, long side ≤ 2048; OpenCV bilinear as mmseg does), then normalised;
3. 448×448 windows with stride 224; per window: the product of both stages' soft assignments, upsampled, each pixel
   in its argmax group;
4. group → class affinity: the group's softmax over the window's top-5 classes times its softmax over all classes;
5. background channel 1 where a pixel's best class score is strictly below min(bg_thresh, the window's largest
   affinity), else 0;
6. windows summed and divided by their overlap count, resized back to the image, softmax over channels, argmax.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config.schema import RESIZE_RULES, ConfigError
from .limits import MAX_BYTES, MAX_PIXELS, WORK_PIXELS
from .text import SEGMENTATION_TEMPLATES, fill_templates, tokenize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ProtocolSettings:
    window: int = 448
    stride: int = 224
    short_side: int = 448
    max_long_side: int = 2048
    bg_thresh: float | None = 0.95  # None: no background class (every pixel gets a named class)
    topk: int = 5  # each window's class set: the top-k classes of its image-level embedding
    resize: str = "uint8"  # one of RESIZE_RULES: "uint8" the release's, "float" torch on the normalised image

    @classmethod
    def of(cls, eval_config, bg_thresh: float | None, **override: int | str | None) -> "ProtocolSettings":
        """The settings of a config's ``eval`` section, with the caller's background threshold; ``override``
        values that are not None (e.g. command-line flags) win."""
        values = {k: getattr(eval_config, k) for k in ("window", "stride", "short_side", "resize")}
        values.update({k: v for k, v in override.items() if v is not None})
        return cls(bg_thresh=bg_thresh, **values)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"window: must be >= 1 pixel, got {self.window}")
        if not 0 < self.stride <= self.window:
            raise ConfigError(f"stride: must be in (0, window={self.window}], got {self.stride}")
        if self.short_side < 1 or self.max_long_side < self.short_side:
            raise ConfigError(f"short_side: need 1 <= short_side ({self.short_side}) <= max_long_side ({self.max_long_side})")
        if self.bg_thresh is not None and not 0 <= self.bg_thresh <= 1:
            raise ConfigError(f"bg_thresh: must be in [0, 1], got {self.bg_thresh}")
        if self.topk < 1:
            raise ConfigError(f"topk: must be >= 1, got {self.topk}")
        if self.resize not in RESIZE_RULES:
            raise ConfigError(f"resize: must be one of {RESIZE_RULES}, got {self.resize!r}")


def background_threshold(chosen: float | None, eval_config, default: float | None = 0.95) -> float | None:
    """The background threshold in force, the first that is set: ``chosen`` (a flag, an experiment's setting), the
    model config's ``eval.bg_thresh``, ``default`` (a dataset's own: 0.95 with a background class, None without).
    An explicit 0.0 is a choice like any other."""
    for value in (chosen, getattr(eval_config, "bg_thresh", None)):
        if value is not None:
            return value
    return default


def clean_class_names(names: Sequence[str] | str) -> list[str]:
    """``"cat, grass, sky"`` or a list → stripped names; empty or repeated names are an error."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    items = [n for n in items if n]
    if not items:
        raise ValueError("the class list is empty: give at least one class name")
    seen = {n for n in items if items.count(n) > 1}
    if seen:
        raise ValueError(f"class names given more than once: {sorted(seen)}")
    return items


@torch.no_grad()
def class_embeddings(model: torch.nn.Module, names: Sequence[str], templates: Sequence[str] = SEGMENTATION_TEMPLATES,
                     batch: int = 256) -> torch.Tensor:
    """[K, D] L2-normalised class embeddings (SPEC §6 step 1)."""
    prompts = fill_templates(list(names), templates)  # [K][T]
    length = model.model_cfg.text.context_length
    tokens = tokenize([p for row in prompts for p in row], length).reshape(len(names), len(templates), length)
    device = next(model.parameters()).device
    return torch.cat([model.class_embeddings(tokens[i:i + batch].to(device)) for i in range(0, len(names), batch)])


# ------------------------------------------------------------------------------------------------ images
def read_image(source: str | Path | bytes | Image.Image, max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> Image.Image:
    """Any image file as 8-bit RGB: EXIF orientation applied; grayscale, palette, RGBA (on white) and 16-bit
    images converted. Raises ValueError naming the file when it cannot be read, or when it is larger than
    ``max_bytes`` or ``max_pixels`` (checked before decoding; Pillow refuses above 2×89 Mpx in any case)."""
    name = "<image>" if isinstance(source, (bytes, Image.Image)) else str(source)
    try:
        size = len(source) if isinstance(source, bytes) else None if isinstance(source, Image.Image) else \
            os.path.getsize(source)
        if size is not None and size > max_bytes:
            raise ValueError(f"{name}: {size / 2**20:.1f} MiB is over the limit of {max_bytes / 2**20:.1f} MiB")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = source if isinstance(source, Image.Image) else Image.open(
                io.BytesIO(source) if isinstance(source, bytes) else source)
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"{name}: {width}×{height} ({width * height / 1e6:.3g} Mpx) is over the limit of "
                             f"{max_pixels / 1e6:g} Mpx")
        image.load()
    except Image.DecompressionBombError as exc:
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        raise ValueError(f"{name}: over the limit of {limit / 1e6:g} Mpx ({exc})") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{name}: not a readable image ({exc})") from None
    except ValueError as exc:
        raise ValueError(str(exc) if str(exc).startswith(name) else f"{name}: not a readable image ({exc})") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grey: rescale to 8 bits
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(arr.round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """8-bit RGB (PIL or [H, W, 3] uint8 array) → [3, H, W] float32, ImageNet-normalised in the 0–255 range as
    mmcv does: (v − 255·mean) / (255·std)."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None] * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None] * 255
    return (arr - mean.float()) / std.float()


def protocol_size(height: int, width: int, settings: ProtocolSettings) -> tuple[int, int]:
    """Short side to ``short_side``, long side at most ``max_long_side``, aspect kept (mmseg's keep-ratio resize)."""
    scale = min(settings.short_side / min(height, width), settings.max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def protocol_input(image: Image.Image | np.ndarray, settings: ProtocolSettings) -> torch.Tensor:
    """An 8-bit RGB image → the normalised [3, h, w] tensor at protocol size, resized by ``settings.resize``:
    ``uint8`` (the release: OpenCV bilinear on the 8-bit pixels, rounded, then normalised) or ``float``
    (normalised first, then torch bilinear without rounding; differs by up to half a grey level per pixel, which
    moves labels only on object borders)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an 8-bit RGB image [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    height, width = arr.shape[:2]
    size = protocol_size(height, width, settings)
    if settings.resize == "uint8":
        return to_tensor(cv2.resize(arr, (size[1], size[0]), interpolation=cv2.INTER_LINEAR))
    return F.interpolate(to_tensor(arr)[None], size=size, mode="bilinear", align_corners=False)[0]


# ------------------------------------------------------------------------------------------------ one window
def group_weights(emb, size: tuple[int, int]) -> torch.Tensor:
    """[B, G, h, w]: each pixel's weight for every final group. The product of every stage's soft assignment
    (softmax over groups, no noise) on the patch grid, upsampled bilinearly to the window."""
    stages = emb.out.stages
    assign = stages[0].assignment.soft.transpose(1, 2)  # [B, N, G0]
    for stage in stages[1:]:
        assign = assign @ stage.assignment.soft.transpose(1, 2)  # [B, N, G_s]
    b, _, groups = assign.shape
    return F.interpolate(assign.transpose(1, 2).reshape(b, groups, *emb.out.grid), size=size, mode="bilinear",
                         align_corners=False)


def group_affinity(emb, classes: torch.Tensor, scale: torch.Tensor, topk: int,
                   candidates: torch.Tensor | None = None) -> torch.Tensor:
    """[B, G, K]: a group's softmax over the window's class set times its softmax over all K classes (exactly 0
    outside the set). The set: the top-k classes of the softmax of the image-level similarities, or ``candidates``
    [B, K] bool in their place (True Label Guidance). Every similarity is a cosine scaled by ``scale``."""
    group_logits = scale * F.normalize(emb.groups, dim=-1) @ classes.t()  # [B, G, K]
    if candidates is None:
        image_probs = (scale * F.normalize(emb.x, dim=-1) @ classes.t()).softmax(dim=-1)  # [B, K]
        top = image_probs.topk(min(topk, classes.shape[0]), dim=-1).indices
        candidates = torch.zeros_like(image_probs, dtype=torch.bool).scatter_(1, top, True)
    gated = group_logits.masked_fill(~candidates[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.nan_to_num(gated * group_logits.softmax(dim=-1))  # an image with no candidate at all: 0


def window_scores(groups: torch.Tensor, affinity: torch.Tensor, size: tuple[int, int],
                  bg_thresh: float | None) -> torch.Tensor:
    """Pixels' groups [B, h·w] and affinities [B, G, K] → [B, (1 +) K, h, w]: a pixel takes its group's row. With a
    background, channel 0 is 1 where the pixel's best class score is strictly below min(bg_thresh, the largest
    affinity of the window, whether or not its group has pixels here) and 0 elsewhere (compared in the affinities'
    precision, as the release does in float32)."""
    b, _, k = affinity.shape
    scores = affinity.gather(1, groups[..., None].expand(-1, -1, k)).transpose(1, 2).reshape(b, k, *size)
    if bg_thresh is None:
        return scores
    threshold = torch.minimum(affinity.flatten(1).max(dim=1).values,
                              torch.tensor(bg_thresh, dtype=affinity.dtype, device=affinity.device))
    background = affinity.max(dim=-1).values < threshold[:, None]  # [B, G]: decided per group
    return torch.cat([background.gather(1, groups).reshape(b, 1, *size).to(scores.dtype), scores], dim=1)


def window_logits(model: torch.nn.Module, crop: torch.Tensor, classes: torch.Tensor, settings: ProtocolSettings,
                  candidates: torch.Tensor | None = None) -> torch.Tensor:
    """One window [B, 3, h, w] → per-pixel scores [B, (1 +) K, h, w] (channel 0 = background when bg_thresh is set).
    ``candidates`` [B, K] bool replaces each window's top-k class set (True Label Guidance)."""
    emb = model.encode_image(crop)
    size = tuple(crop.shape[-2:])
    affinity = group_affinity(emb, classes, model.itc_scale(), settings.topk, candidates)
    groups = group_weights(emb, size).max(dim=1).indices.flatten(1)  # [B, h·w]; a tie: the first group
    return window_scores(groups, affinity, size, settings.bg_thresh)


# ------------------------------------------------------------------------------------------------ the image
def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins along one side (mmseg's slide inference): the last window ends at the border."""
    if size <= window:
        return [0]
    n = (size - window + stride - 1) // stride + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


def window_boxes(height: int, width: int, settings: ProtocolSettings) -> list[tuple[int, int, int, int]]:
    """The windows (y0, x0, y1, x1) of an image at protocol size, row by row, left to right."""
    win, stride = settings.window, settings.stride
    return [(y, x, min(y + win, height), min(x + win, width)) for y in window_starts(height, win, stride)
            for x in window_starts(width, win, stride)]


def _size(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return box[2] - box[0], box[3] - box[1]


@torch.no_grad()
def sliding_logits_many(model: torch.nn.Module, images: Sequence[torch.Tensor], classes: torch.Tensor,
                        settings: ProtocolSettings, candidates: Sequence[torch.Tensor | None] | None = None,
                        batch: int = 8) -> list[torch.Tensor]:
    """Several [3, H, W] normalised images at protocol size → each one's [C, H, W]: its windows' scores summed (row
    by row, left to right, as mmseg visits them) and divided by the number of windows covering each pixel.

    The windows of all the images go through the model together, ``batch`` at a time (consecutive windows of one
    size); ``candidates``: per image, a [K] bool mask replacing its windows' top-k class sets, or None (its own
    top-k)."""
    candidates = list(candidates) if candidates is not None else [None] * len(images)
    windows = [(i, box) for i, image in enumerate(images) for box in window_boxes(*image.shape[1:], settings)]
    chunks: list[list[tuple[int, tuple[int, int, int, int]]]] = []
    for i, (y0, x0, y1, x1) in windows:  # in order; a chunk: windows of one size (an image's are all alike), with
        last = chunks[-1] if chunks else None  # candidates or without
        if (last is None or len(last) == batch or _size(last[0][1]) != (y1 - y0, x1 - x0)
                or (candidates[last[0][0]] is None) != (candidates[i] is None)):
            chunks.append([])
        chunks[-1].append((i, (y0, x0, y1, x1)))
    totals: list[torch.Tensor | None] = [None] * len(images)
    counts = [torch.zeros(1, *image.shape[1:], device=image.device) for image in images]
    for chunk in chunks:
        crops = torch.stack([images[i][:, y0:y1, x0:x1] for i, (y0, x0, y1, x1) in chunk])
        cand = None if candidates[chunk[0][0]] is None else torch.stack([candidates[i] for i, _ in chunk])
        logits = window_logits(model, crops, classes, settings, cand)
        for (i, (y0, x0, y1, x1)), crop_logits in zip(chunk, logits):  # each image's windows summed in its order
            if totals[i] is None:
                totals[i] = images[i].new_zeros(logits.shape[1], *images[i].shape[1:])
            totals[i][:, y0:y1, x0:x1] += crop_logits
            counts[i][:, y0:y1, x0:x1] += 1
    return [total / count for total, count in zip(totals, counts)]


def sliding_logits(model: torch.nn.Module, image: torch.Tensor, classes: torch.Tensor, settings: ProtocolSettings,
                   candidates: torch.Tensor | None = None, batch: int = 8) -> torch.Tensor:
    """One image's :func:`sliding_logits_many`."""
    return sliding_logits_many(model, [image], classes, settings, [candidates], batch)[0]


@dataclass
class Segmentation:
    labels: torch.Tensor  # [H, W] long at the original size: 0 = background (if any), i = i-th class
    names: list[str]  # the label names, index = label id ("background" first when bg_thresh is set)
    probs: torch.Tensor  # [C, H, W] at the original size: softmax over the channels of the averaged window scores

    def areas(self) -> dict[str, float]:
        """Fraction of the image each label covers (labels that do not occur are left out)."""
        return label_areas(self.labels, self.names)


def label_areas(labels: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Fraction of ``labels`` (any integer map) each name covers; names that do not occur are left out."""
    counts = torch.zeros(len(names), dtype=torch.float64)
    for rows in labels.split(1024):  # in row blocks: a large map is not copied whole to int64
        counts += torch.bincount(rows.flatten().long(), minlength=len(names)).double()
    fractions = counts / counts.sum()
    return {n: float(f) for n, f in zip(names, fractions) if f > 0}


def downscale(image: Image.Image, max_pixels: int = WORK_PIXELS) -> Image.Image:
    """``image`` itself when it has at most ``max_pixels``, else a box-filtered copy with that many (aspect kept):
    the protocol's own resize goes to a short side of 448 anyway, and the full-size scores would not fit."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = (max_pixels / (width * height)) ** 0.5
    return image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.BOX)


def segment_image(segmenter: "Segmenter", image: Image.Image,
                  work_pixels: int = WORK_PIXELS) -> tuple[torch.Tensor, Segmentation, Image.Image]:
    """One decoded image, however large: (labels at the image's size, the segmentation of the image segmented, that
    image: ``image`` itself, or a copy downscaled to ``work_pixels`` whose labels were upscaled)."""
    work = downscale(image, work_pixels)
    result = segmenter(work)
    return _at_size(result.labels, work, image), result, work


def segment_images(segmenter: "Segmenter", images: Sequence[Image.Image],
                   work_pixels: int = WORK_PIXELS) -> list[tuple[torch.Tensor, Segmentation, Image.Image]]:
    """What :func:`segment_image` gives each of several images, their windows through the model together."""
    works = [downscale(image, work_pixels) for image in images]
    arrays = [np.asarray(work) for work in works]
    results = segmenter.segment_many([(protocol_input(a, segmenter.settings), a.shape[:2], None) for a in arrays])
    return [(_at_size(r.labels, work, image), r, work) for image, work, r in zip(images, works, results)]


def _at_size(labels: torch.Tensor, work: Image.Image, image: Image.Image) -> torch.Tensor:
    """The labels of ``work`` at the size of ``image`` (the same picture, or it downscaled)."""
    return labels if work is image else upscale_labels(labels, (image.height, image.width))


def upscale_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A label map [h, w] → [H, W] by nearest neighbour (int16 or int32, so a large image stays small)."""
    h, w = labels.shape
    rows = (torch.arange(size[0]) * h // size[0]).clamp_(max=h - 1)
    cols = (torch.arange(size[1]) * w // size[1]).clamp_(max=w - 1)
    small = labels.to(torch.int16 if int(labels.max()) < 2**15 else torch.int32)
    return small.index_select(0, rows).index_select(1, cols)  # (no [H, W] index tensors)


class Segmenter:
    """A model, its class list and the protocol: ``segmenter(image)`` → :class:`Segmentation`.

    >>> model, config = pgseg.checkpoint.load_model("model.safetensors")
    >>> seg = Segmenter(model, ["cat", "grass", "sky"])(read_image("photo.jpg"))
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str] | str,
                 settings: ProtocolSettings | None = None, templates: Sequence[str] = SEGMENTATION_TEMPLATES,
                 batch: int = 8):
        self.model = model.eval()
        self.class_names = clean_class_names(class_names)
        self.settings = settings or ProtocolSettings()
        self.classes = class_embeddings(model, self.class_names, templates)
        self.names = (["background"] if self.settings.bg_thresh is not None else []) + self.class_names
        if batch < 1:
            raise ValueError(f"batch: windows per forward pass must be >= 1, got {batch}")
        self.batch = batch  # windows per forward pass, of one image or of several

    @torch.no_grad()
    def __call__(self, image: Image.Image | np.ndarray | str | Path | bytes,
                 candidates: Sequence[int] | None = None) -> Segmentation:
        """``image``: an 8-bit RGB array [H, W, 3], or what :func:`read_image` reads; ``candidates``: class indices
        (0-based over the class list) that replace the top-k set of every window (True Label Guidance)."""
        arr = image if isinstance(image, np.ndarray) else np.asarray(read_image(image))
        return self.segment(protocol_input(arr, self.settings), tuple(arr.shape[:2]), candidates)

    def segment(self, resized: torch.Tensor, size: tuple[int, int],
                candidates: Sequence[int] | None = None) -> Segmentation:
        """A normalised [3, h, w] image already at protocol size → labels and probabilities at ``size`` (H, W)."""
        return self.segment_many([(resized, size, candidates)])[0]

    @torch.no_grad()
    def segment_many(self, inputs: Sequence[tuple[torch.Tensor, tuple[int, int], Sequence[int] | None]]
                     ) -> list[Segmentation]:
        """Several (resized image, original size, candidates) at once, their windows batched together: what
        :meth:`segment` gives each of them."""
        device = self.classes.device
        masks = []
        for _, _, candidates in inputs:
            mask = None
            if candidates is not None:
                mask = torch.zeros(len(self.class_names), dtype=torch.bool, device=device)
                mask[torch.as_tensor(list(candidates), dtype=torch.long, device=device)] = True
            masks.append(mask)
        all_logits = sliding_logits_many(self.model, [resized.to(device) for resized, _, _ in inputs], self.classes,
                                          self.settings, masks, self.batch)
        out = []
        for logits, (_, size, _) in zip(all_logits, inputs):
            probs = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].softmax(dim=0)
            out.append(Segmentation(probs.max(dim=0).indices.cpu(), self.names, probs.cpu()))  # a tie: the lower
        return out
