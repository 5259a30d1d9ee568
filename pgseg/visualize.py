"""Pictures of segmentations: palette masks (VOC colours), overlays with a legend, grids of overlays."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map: label bits spread over the high bits of R, G and B (768 values)."""
    palette = []
    for label in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((label >> (3 * bit + channel)) & 1) << (7 - bit)
        palette += rgb
    return palette


PALETTE = voc_palette()
PALETTE_RGB = np.array(PALETTE, np.uint8).reshape(256, 3)  # label id → its colour


def png_bytes(picture: Image.Image) -> bytes:
    """A picture as the bytes of a PNG file."""
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def palette_mask(labels: torch.Tensor | np.ndarray) -> Image.Image:
    """[H, W] label ids → a palette PNG image (the ids are the pixel values; colours for viewing)."""
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.max(initial=0) > 255:
        raise ValueError("a palette mask holds at most 256 labels; write ids as 16-bit PNG instead")
    image = Image.fromarray(arr.astype(np.uint8), "P")
    image.putpalette(PALETTE)
    return image


MIN_SIDE = 192  # overlays of smaller images are enlarged (nearest neighbour) to this short side


def overlay(image: Image.Image, labels: torch.Tensor | np.ndarray, names: Sequence[str], alpha: float = 0.5,
            legend: bool = True, legend_also: np.ndarray | None = None) -> Image.Image:
    """The image with its label colours blended in (background, label 0 when named so, left clear) and a legend of
    the labels present (and of those in ``legend_also``, e.g. the ground truth drawn beside it)."""
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    factor = -(-MIN_SIDE // min(arr.shape)) if min(arr.shape) < MIN_SIDE else 1
    if factor > 1:  # small images (the shapes world's 64 px) drawn large enough to see
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
        arr = arr.repeat(factor, axis=0).repeat(factor, axis=1)
    colours = PALETTE_RGB[arr.astype(np.int64) % 256]
    base = np.asarray(image.convert("RGB"), np.float32)
    blend = base * (1 - alpha) + colours.astype(np.float32) * alpha
    if names and names[0] == "background":
        blend[arr == 0] = base[arr == 0]
    out = Image.fromarray(blend.clip(0, 255).astype(np.uint8))
    if not legend:
        return out
    shown = np.unique(arr) if legend_also is None else np.union1d(arr, np.asarray(legend_also))
    present = [int(i) for i in shown if i < len(names) and not (i == 0 and names[0] == "background")]
    font = ImageFont.load_default()
    row = 14
    panel = Image.new("RGB", (out.width + 150, max(out.height, row * len(present) + 8)), (255, 255, 255))
    panel.paste(out, (0, 0))
    draw = ImageDraw.Draw(panel)
    for k, label in enumerate(present):
        y = 4 + k * row
        colour = tuple(PALETTE[3 * label: 3 * label + 3])
        draw.rectangle([out.width + 6, y, out.width + 18, y + 10], fill=colour, outline=(0, 0, 0))
        draw.text((out.width + 24, y - 1), names[label][:20], fill=(0, 0, 0), font=font)
    return panel


def comparison(image: Image.Image, target: np.ndarray, labels: torch.Tensor | np.ndarray,
               names: Sequence[str]) -> Image.Image:
    """image | ground truth | prediction side by side, one legend for both (ignored pixels, 255, in VOC's border
    colour)."""
    target = np.asarray(target)
    panels = [overlay(image, target, names, alpha=0.0, legend=False), overlay(image, target, names, legend=False),
              overlay(image, labels, names, legend_also=target)]
    out = Image.new("RGB", (sum(p.width for p in panels) + 8, max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for panel in panels:
        out.paste(panel, (x, 0))
        x += panel.width + 4
    return out


def grid(images: Sequence[Image.Image], columns: int = 4, cell: int = 256) -> Image.Image:
    """Images side by side, each fitted into a ``cell``-pixel-high tile."""
    if not images:
        raise ValueError("no images for the grid")
    tiles = [im.resize((max(1, round(im.width * cell / im.height)), cell)) for im in images]
    width = max(t.width for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    out = Image.new("RGB", (width * min(columns, len(tiles)), cell * rows), (255, 255, 255))
    for i, tile in enumerate(tiles):
        out.paste(tile, ((i % columns) * width, (i // columns) * cell))
    return out
