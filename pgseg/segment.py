"""Zero-shot segmentation with the published protocol (SPEC §6), on any image and any list of class names.

1. class embeddings: prompts → text encoder → projector → mean over templates → L2-normalise;
2. resize (short side 448, long side ≤ 2048), 448×448 sliding windows with stride 224, overlap averaging;
3. per window: the product of both stages' soft assignments, upsampled, argmax group (one-hot);
4. group → class: softmax over classes of s·groups·classesᵀ, gated by the image-level top-5 classes;
5. background where the best class score is under min(bg_thresh, max affinity); resize back; argmax.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .text import SEGMENTATION_TEMPLATES, fill_templates, tokenize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # what folders are searched for
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ProtocolSettings:
    window: int = 448
    stride: int = 224
    short_side: int = 448
    max_long_side: int = 2048
    bg_thresh: float | None = 0.95  # None: no background class (every pixel gets a named class)
    topk: int = 5  # image-level gating: only the top-k classes of the image compete

    def __post_init__(self) -> None:
        if not 0 < self.stride <= self.window:
            raise ValueError(f"stride must be in (0, window={self.window}], got {self.stride}")
        if self.short_side < 1 or self.max_long_side < self.short_side:
            raise ValueError("need 1 <= short_side <= max_long_side")
        if self.bg_thresh is not None and not 0 <= self.bg_thresh <= 1:
            raise ValueError(f"bg_thresh must be in [0, 1], got {self.bg_thresh}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")


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
def read_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Any image file as 8-bit RGB: EXIF orientation applied; grayscale, palette, RGBA (on white) and 16-bit
    images converted. Raises ValueError naming the file when it cannot be read."""
    name = "<image>" if isinstance(source, (bytes, Image.Image)) else str(source)
    try:
        image = source if isinstance(source, Image.Image) else Image.open(
            io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{name}: not a readable image ({exc})") from None
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


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL → [3, H, W] float32, ImageNet-normalised."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (arr - mean) / std


def protocol_size(height: int, width: int, settings: ProtocolSettings) -> tuple[int, int]:
    """Short side to ``short_side``, long side at most ``max_long_side``, aspect kept (mmseg's keep-ratio resize)."""
    scale = min(settings.short_side / min(height, width), settings.max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


# ------------------------------------------------------------------------------------------------ the protocol
def window_logits(model: torch.nn.Module, crop: torch.Tensor, classes: torch.Tensor, settings: ProtocolSettings,
                  candidates: torch.Tensor | None = None) -> torch.Tensor:
    """One window [B, 3, h, w] → per-pixel scores [B, (1 +) K, h, w] (channel 0 = background when bg_thresh is set).

    ``candidates`` [B, K] bool restricts each image's classes (True Label Guidance)."""
    emb = model.encode_image(crop)
    stages = emb.out.stages
    assign = stages[0].assignment.soft.transpose(1, 2)  # [B, N, G0]
    for stage in stages[1:]:
        assign = assign @ stage.assignment.soft.transpose(1, 2)  # [B, N, G_s]
    b, _, groups = assign.shape
    gh, gw = emb.out.grid
    h, w = crop.shape[-2:]
    maps = F.interpolate(assign.transpose(1, 2).reshape(b, groups, gh, gw), size=(h, w), mode="bilinear",
                         align_corners=False)  # [B, G, h, w]
    onehot = F.one_hot(maps.argmax(dim=1), groups).permute(0, 3, 1, 2).to(classes.dtype)  # [B, G, h, w]
    scale = model.itc_scale()
    group_logits = scale * F.normalize(emb.groups, dim=-1) @ classes.t()  # [B, G, K]
    image_logits = scale * F.normalize(emb.x, dim=-1) @ classes.t()  # [B, K]
    if candidates is not None:
        group_logits = group_logits.masked_fill(~candidates[:, None, :], float("-inf"))
        image_logits = image_logits.masked_fill(~candidates, float("-inf"))
    affinity = group_logits.softmax(dim=-1)  # [B, G, K]: over classes
    k = min(settings.topk, classes.shape[0])
    top = image_logits.topk(k, dim=-1)
    gate = torch.zeros_like(image_logits).scatter_(1, top.indices, top.values.softmax(dim=-1))  # [B, K]
    affinity = torch.nan_to_num(affinity * gate[:, None, :])  # a class masked out everywhere: 0
    scores = torch.einsum("bgk,bghw->bkhw", affinity, onehot)  # each pixel: its group's affinities
    if settings.bg_thresh is None:
        return scores
    bg = torch.minimum(affinity.flatten(1).max(dim=1).values, torch.tensor(settings.bg_thresh, dtype=scores.dtype,
                                                                        device=scores.device))  # [B]
    return torch.cat([bg[:, None, None, None].expand(b, 1, h, w), scores], dim=1)


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins along one side (mmseg's slide inference): the last window ends at the border."""
    if size <= window:
        return [0]
    n = (size - window + stride - 1) // stride + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


@torch.no_grad()
def sliding_logits(model: torch.nn.Module, image: torch.Tensor, classes: torch.Tensor, settings: ProtocolSettings,
                   candidates: torch.Tensor | None = None, batch: int = 8) -> torch.Tensor:
    """[3, H, W] normalised image at protocol size → [C, H, W] scores averaged over the overlapping windows."""
    _, height, width = image.shape
    win = settings.window
    boxes = [(y, x, min(y + win, height), min(x + win, width)) for y in _starts(height, win, settings.stride)
             for x in _starts(width, win, settings.stride)]
    total, count = None, torch.zeros(1, height, width, device=image.device)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        crops = torch.stack([image[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])  # same size within a slide
        cand = None if candidates is None else candidates[None].expand(len(chunk), -1)
        logits = window_logits(model, crops, classes, settings, cand)
        if total is None:
            total = image.new_zeros(logits.shape[1], height, width)
        for (y0, x0, y1, x1), crop_logits in zip(chunk, logits):
            total[:, y0:y1, x0:x1] += crop_logits
            count[:, y0:y1, x0:x1] += 1
    return total / count


@dataclass
class Segmentation:
    labels: torch.Tensor  # [H, W] long at the original size: 0 = background (if any), i = i-th class
    names: list[str]  # the label names, index = label id ("background" first when bg_thresh is set)
    scores: torch.Tensor  # [C, H, W] at the original size

    def areas(self) -> dict[str, float]:
        """Fraction of the image each label covers (labels that do not occur are left out)."""
        counts = torch.bincount(self.labels.flatten(), minlength=len(self.names)).double()
        fractions = counts / counts.sum()
        return {n: float(f) for n, f in zip(self.names, fractions) if f > 0}


class Segmenter:
    """A model, its class list and the protocol: ``segmenter(image)`` → :class:`Segmentation`.

    >>> model, config = pgseg.checkpoint.load_model("model.safetensors")
    >>> seg = Segmenter(model, ["cat", "grass", "sky"])(read_image("photo.jpg"))
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str] | str,
                 settings: ProtocolSettings | None = None, templates: Sequence[str] = SEGMENTATION_TEMPLATES):
        self.model = model.eval()
        self.class_names = clean_class_names(class_names)
        self.settings = settings or ProtocolSettings()
        self.classes = class_embeddings(model, self.class_names, templates)
        self.names = (["background"] if self.settings.bg_thresh is not None else []) + self.class_names

    @torch.no_grad()
    def __call__(self, image: Image.Image | torch.Tensor, candidates: Sequence[int] | None = None) -> Segmentation:
        """``image``: PIL (any mode) or a normalised [3, H, W] tensor; ``candidates``: class indices (0-based over
        the class list) allowed for this image (True Label Guidance)."""
        tensor = to_tensor(read_image(image)) if isinstance(image, Image.Image) else image
        device = self.classes.device
        height, width = tensor.shape[-2:]
        resized = F.interpolate(tensor[None].to(device), size=protocol_size(height, width, self.settings),
                                mode="bilinear", align_corners=False)[0]
        mask = None
        if candidates is not None:
            mask = torch.zeros(len(self.class_names), dtype=torch.bool, device=device)
            mask[torch.as_tensor(list(candidates), dtype=torch.long, device=device)] = True
        logits = sliding_logits(self.model, resized, self.classes, self.settings, mask)
        scores = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return Segmentation(scores.argmax(dim=0).cpu(), self.names, scores.cpu())
