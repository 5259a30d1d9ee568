"""The released code's zero-shot segmentation outputs (``released_fixture/segmentation.pt``, SPEC §6) as cases to
score against: shared by the parity test and the device check."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

IMAGES = ("img0", "img1", "img2", "img3")
LISTS = ("c4", "c6", "c12")
SETTINGS = {"bg0.95": 0.95, "bg0.5": 0.5, "bg0.1": 0.1, "bg0.045": 0.045, "nobg": None}


@dataclass
class Reference:
    tensors: dict[str, torch.Tensor]
    meta: dict

    @classmethod
    def load(cls, fixture_dir: Path) -> "Reference":
        tensors = torch.load(Path(fixture_dir) / "segmentation.pt")
        meta = json.loads((Path(fixture_dir) / "segmentation_prompts.json").read_text())
        for name, value in SETTINGS.items():  # the settings this module names are the fixture's
            spec = meta["settings"][name]
            if value != (spec["bg_thresh"] if spec["with_bg"] else None):
                raise ValueError(f"segmentation_prompts.json: setting {name} is not {value}")
        return cls(tensors, meta)

    def image(self, image: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """The normalised [3, H, W] input at protocol size, and the size its labels come back at."""
        return self.tensors[f"{image}.image"].float()[0], tuple(self.tensors[f"{image}.ori_shape"].tolist())

    def lists(self) -> Iterator[tuple[str, list[str], str, float | None]]:
        """(class list, its names, setting, bg_thresh) for the 15 combinations."""
        for lst in LISTS:
            for setting, bg in SETTINGS.items():
                yield lst, self.meta["class_lists"][lst], setting, bg

    def compare(self, image: str, lst: str, setting: str, labels: torch.Tensor,
                probs: torch.Tensor) -> tuple[float, float]:
        """Our final labels [H, W] and probabilities [C, H, W] against the release's: (fraction of labels that
        agree, max |Δ| of the probabilities stored: every pixel, or every 8th row and column of img2)."""
        t, case = self.tensors, f"{image}.{lst}.{setting}"
        if image == "img2":  # resized to 200×150: labels in full, probabilities every 8th pixel
            ref_labels, ref_probs, probs = t[f"{case}.labels"].long(), t[f"{case}.probs_sub"], probs[:, ::8, ::8]
        else:  # stored once per signature (each pixel's group in every window)
            sig = t[f"{image}.sig"].long()
            ref_labels, ref_probs = t[f"{case}.labels_pal"].long()[sig], t[f"{case}.probs_pal"][sig].permute(2, 0, 1)
        if labels.shape != ref_labels.shape or probs.shape != ref_probs.shape:
            raise ValueError(f"{case}: shapes {tuple(labels.shape)}/{tuple(probs.shape)} vs "
                             f"{tuple(ref_labels.shape)}/{tuple(ref_probs.shape)}")
        agree = (labels.cpu() == ref_labels).double().mean().item()
        return agree, (probs.cpu() - ref_probs).abs().max().item()
