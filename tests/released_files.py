"""Files in the layouts of the released PGSeg and GroupViT checkpoints (random tensors at a given architecture,
with the entries a released file pickles besides the weights), for the checkpoint and training tests."""
import torch

from pgseg.config import load_config
from pgseg.model import PGSeg


def groupvit_release_file(path, layout: str, config_name: str = "tiny", overrides=()) -> dict:
    """A file in the layout of one of GroupViT's released checkpoints, random tensors at this architecture:
    ``gcc_yfcc_30e`` (trained with the multi-label loss: has its own ``multi_label_logit_scale``) or
    ``gcc_redcap_30e`` (without); both with the entries a released file carries besides the weights (an
    OmegaConf-like config object, apex state, optimizer, epoch). Returns the state_dict written."""
    state = released_layout_state(config_name, groupvit=True, overrides=overrides)
    if layout == "gcc_yfcc_30e":
        state["multi_label_logit_scale"] = torch.tensor(2.5)
    elif layout != "gcc_redcap_30e":
        raise ValueError(layout)
    torch.save({"model": state, "config": OmegaLike(model={"type": "MultiLabelContrastive"}), "amp": Apex(),
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 30}, path)
    return state


def released_layout_state(config_name: str, *, groupvit: bool = False, overrides=()) -> dict:
    """Random tensors in the released layout of this architecture (incl. the unused mapping_text, conv kernels)."""
    model = PGSeg.from_config(load_config(config_name, ["npr.mode=official", *overrides]))
    state = {}
    for name, value in model.state_dict().items():
        if groupvit and ("downsample_spatial" in name or name in ("img_encoder.logit_scale", "text_encoder.Atten.mu")):
            continue
        rand = torch.randn_like(value.float()).to(value.dtype) if value.is_floating_point() else value.clone()
        if value.ndim == 2 and (".linear_hidden.0.weight" in name or ".linear_out.weight" in name):
            rand = rand[..., None]  # the release's 1×1 Conv1d
        state[name] = rand
    if not groupvit:
        dim = model.model_cfg.image.embed_dim
        state["img_encoder.mapping_text.linear_hidden.0.weight"] = torch.randn(4096, dim, 1)
        state["img_encoder.mapping_text.linear_out.weight"] = torch.randn(256, 4096, 1)
    return state


class OmegaLike(dict):
    """Stands for the OmegaConf config object the released files pickle."""


class Apex:
    """Stands for apex's amp state (an object torch's weights_only loader refuses)."""

    def __init__(self):
        self.loss_scale = 1024.0
