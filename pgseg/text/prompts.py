"""Prompt templates of the published protocol (SPEC §6)."""
from __future__ import annotations

from typing import Sequence

SEGMENTATION_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)


def fill_templates(names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """[class][template] prompt strings; an empty or blank class name is an error naming its position."""
    if len(names) == 0:
        raise ValueError("the class list is empty")
    out = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class name #{i} is empty")
        out.append([t.format(name.strip()) for t in templates])
    return out
