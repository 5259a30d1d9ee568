"""Zero-shot image classification (SPEC §6, ImageNet): class embeddings from the 7 ImageNet templates, images
resized (short side to 256/224 of the model's input) and centre-cropped to the model's input, top-1/top-5 accuracy.
Data: webdataset shards with ``jpg`` + ``cls`` members, or a class-folder tree (``ROOT/<class folder>/<images>``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .limits import IMAGE_SUFFIXES
from .segment import class_embeddings, clean_class_names, read_image, to_tensor
from .text import IMAGENET_TEMPLATES


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to ``size·256/224`` (bicubic), centre-crop ``size``, normalise → [3, size, size]."""
    image = TF.resize(image, int(size * 256 / 224), interpolation=InterpolationMode.BICUBIC)
    return to_tensor(TF.center_crop(image, [size, size]))


class ZeroShotClassifier:
    """A model and its class names: ``classifier(images)`` → logits [B, K]."""

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], templates: Sequence[str] = IMAGENET_TEMPLATES):
        self.model = model.eval()
        self.class_names = clean_class_names(list(class_names))
        self.classes = class_embeddings(model, self.class_names, templates)
        self.size = model.model_cfg.image.img_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.encode_image(images.to(self.classes.device), groups=False).x
        return F.normalize(x, dim=-1) @ self.classes.t()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many of the rows have their label among the top-k logits, for each k (k capped at the class count)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {labels.shape[0]} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must be in 0..{logits.shape[1] - 1}, got {labels.min().item()}..{labels.max().item()}")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    return {k: int((top[:, :k] == labels[:, None]).any(dim=1).sum()) for k in ks}


def read_class_names(path: str | Path, folders: Sequence[str] | None = None) -> list[str]:
    """Class names from a text file. One name per line, in label order; or, for a class-folder tree, lines
    ``FOLDER NAME…`` (e.g. ``n01440764 tench``) mapping each folder to its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class names {path}: no such file")
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if folders is not None:
        mapping = {}
        for line in lines:
            head, _, rest = line.partition(" ") if "\t" not in line else line.partition("\t")
            if head in folders and rest.strip():
                mapping[head] = rest.strip()
        if mapping:
            missing = [f for f in folders if f not in mapping]
            if missing:
                raise ValueError(f"class names {path}: no name for folder(s) {missing[:5]}")
            return [mapping[f] for f in folders]
        if len(lines) != len(folders):
            raise ValueError(f"class names {path}: {len(lines)} names for {len(folders)} class folders")
    return clean_class_names(lines)


def folder_samples(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """A class-folder tree → (folder names in sorted order, [(image path, label)])."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root}: no class folders")
    samples = [(str(p), label) for label, name in enumerate(folders) for p in sorted((root / name).iterdir())
               if p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise ValueError(f"{root}: no images in its class folders")
    return folders, samples


def load_image(data: bytes | str, size: int) -> torch.Tensor:
    return preprocess(read_image(data), size)
