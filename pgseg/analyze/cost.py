"""Table 6 for a model: parameters and FLOPs at a given image size, counted by torch's FLOP counter
(``torch.utils.flop_counter``) on one image through the image encoder as segmentation runs it (groups and their
projection) and one caption through the text encoder. Counted: matrix products, convolutions and attention (one
multiply-add = 2 FLOPs). Not counted: element-wise work (normalisation, softmax, activations, the Gumbel noise),
index operations, and in training the assignment solver of NPR's matching (SciPy/numba on the CPU or our GPU
solver), which are not tensor FLOPs the counter knows."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ModelCost:
    image_size: int
    params: dict[str, int]  # image encoder (+ its projector), text encoder (+ its projector), total
    gflops: dict[str, float]  # image (one image at image_size), text (one caption at the context length)


def _count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def model_cost(model: torch.nn.Module, image_size: int) -> ModelCost:
    """The cost of ``model`` (a :class:`pgseg.model.PGSeg`) for one ``image_size``² image and one caption."""
    if image_size < model.img_encoder.cfg.patch_size:
        raise ValueError(f"image size {image_size} is below the patch size {model.img_encoder.cfg.patch_size}")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        image = torch.zeros(1, 3, image_size, image_size, device=device)
        length = model.text_encoder.cfg.context_length
        tokens = torch.zeros(1, length, dtype=torch.long, device=device)
        tokens[0, 0], tokens[0, 1] = 49406, 49407  # start and end of text: a one-word caption padded to length
        image_flops = _count(lambda: model.encode_image(image))
        text_flops = _count(lambda: model.text_projector(model.text_encoder(tokens)))
    finally:
        model.train(was_training)

    def size(*modules) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    image_params = size(model.img_encoder, model.img_projector)
    text_params = size(model.text_encoder, model.text_projector)
    return ModelCost(image_size, {"image": image_params, "text": text_params, "total": size(model)},
                     {"image": image_flops / 1e9, "text": text_flops / 1e9})


__all__ = ["ModelCost", "model_cost"]
