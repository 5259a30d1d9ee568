import os
import subprocess
import sys
import zipfile

import pytest
import torch

from pgseg.checkpoint import (CheckpointError, extract_state_dict, init_from_checkpoint, load_model, load_released,
                              model_step, read_checkpoint_file, read_model_config, save_model)
from pgseg.config import load_config
from pgseg.model import PGSeg

from conftest import REPO
from released_files import Apex, OmegaLike, groupvit_release_file, released_layout_state


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_random_released_layout_converts_with_nothing_missing(tmp_path):
    state = released_layout_state("tiny")
    path = tmp_path / "released.pth"
    torch.save({"model": state, "config": OmegaLike(lr=1.0), "amp": Apex(), "epoch": 3}, path)
    model = PGSeg.from_config(load_config("tiny", ["npr.mode=official"]))
    report = load_released(model, path, "pgseg-official")
    assert report.ok and not report.missing and not report.unexpected
    assert len(report.loaded) == len(model.state_dict()) and len(report.dropped) == 2
    torch.testing.assert_close(model.img_projector.linear_out.weight, state["img_projector.linear_out.weight"][..., 0])
    torch.testing.assert_close(model.text_encoder.Atten.mu, state["text_encoder.Atten.mu"])


def test_groupvit_layout_loads_into_the_groupvit_part(tmp_path):
    state = released_layout_state("tiny", groupvit=True)
    path = tmp_path / "groupvit.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)  # with a DDP prefix
    model = PGSeg.from_config(load_config("tiny", ["npr.mode=official"]))
    mu_before = model.img_encoder.layers[0].downsample_spatial.mu.clone()
    report = load_released(model, path, "groupvit-official")
    assert report.ok and len(report.expected_missing) > 0
    assert all("downsample_spatial" in k or k in ("img_encoder.logit_scale", "text_encoder.Atten.mu")
               for k in report.expected_missing)
    assert torch.equal(model.img_encoder.layers[0].downsample_spatial.mu, mu_before)  # NPR parts keep their init
    torch.testing.assert_close(model.img_encoder.pos_embed, state["img_encoder.pos_embed"])
    with pytest.raises(CheckpointError, match="missing"):  # a GroupViT file is not a PGSeg one
        load_released(PGSeg.from_config(load_config("tiny", ["npr.mode=official"])), path, "pgseg-official")


def test_wrong_architecture_fails_with_the_report(tmp_path):
    path = tmp_path / "released.pth"
    torch.save({"model": released_layout_state("tiny")}, path)
    other = PGSeg.from_config(load_config("tiny", ["model.image.embed_dim=32", "model.image.num_heads=[2,2,2]"]))
    with pytest.raises(CheckpointError, match="shape mismatch: [1-9]"):
        load_released(other, path)


def test_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for legacy in (False, True):
        path = tmp_path / f"evil_{legacy}.pth"
        torch.save({"model": {"w": torch.zeros(2)}, "config": _Evil(marker)}, path,
                   _use_new_zipfile_serialization=not legacy)
        obj = read_checkpoint_file(path)
        assert not marker.exists()
        assert torch.equal(obj["model"]["w"], torch.zeros(2))
        assert "system" in repr(obj["config"]) and f"touch {marker}" in obj["config"].args[0]
    raw = tmp_path / "evil.pkl"
    import pickle
    raw.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError):
        read_checkpoint_file(raw)
    assert not marker.exists()


def test_truncated_empty_and_foreign_files(tmp_path):
    torch.save({"model": released_layout_state("tiny"), "config": OmegaLike(lr=1.0)}, tmp_path / "good.pth")
    good = (tmp_path / "good.pth").read_bytes()
    cases = {"truncated.pth": good[: len(good) // 3], "empty.pth": b"", "text.pth": b"hello, I am not a model\n",
             "zip.pth": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "zip.pth", "w") as zf:
        zf.writestr("readme.txt", "not a checkpoint")
    for name, pattern in [("truncated.pth", "truncated"), ("empty.pth", "empty"), ("text.pth", "not a PyTorch"),
                          ("zip.pth", "not a PyTorch"), ("missing.pth", "no such")]:
        with pytest.raises(CheckpointError, match=pattern):
            read_checkpoint_file(tmp_path / name)
    torch.save({"model": {"a": 1}}, tmp_path / "nontensor.pth")
    with pytest.raises(CheckpointError, match="not name→tensor"):
        extract_state_dict(read_checkpoint_file(tmp_path / "nontensor.pth"))


def test_own_format_round_trip_and_refusals(tmp_path):
    config = load_config("tiny", ["npr.phi=0.25"])
    model = PGSeg.from_config(config).eval()
    path = save_model(model, config, tmp_path / "m.safetensors")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    loaded, loaded_config = load_model(path)
    assert loaded_config.npr.phi == 0.25
    assert model_step(path) is None  # not a trained model's: no step
    assert model_step(save_model(model, config, tmp_path / "at.safetensors", step=12)) == 12
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images).x, model.encode_image(images).x)
    with pytest.raises(CheckpointError, match="end in .safetensors"):
        save_model(model, config, tmp_path / "m.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_model_config(tmp_path / "bad.safetensors")


def test_pgseg_convert_command(tmp_path, fixture_dir):
    out = tmp_path / "converted.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "convert", "--from", "pgseg-official",
                           str(fixture_dir / "released_layout_small.pth"), str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loaded: 212 tensors" in proc.stdout and "dropped on purpose: 9" in proc.stdout and "missing: 0" in proc.stdout
    model, config = load_model(out)
    assert config.model.image.embed_dim == 96 and config.npr.mode == "official"
    # converting a PGSeg file as a GroupViT one is refused, and nothing is written
    bad_out = tmp_path / "bad.safetensors"
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "convert", "--from", "groupvit-official",
                           str(fixture_dir / "released_layout_small.pth"), str(bad_out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "nothing was written" in proc.stderr and not bad_out.exists()


def _from_released_key_list(reference_dir, skip_pgseg_only: bool = False,
                            name: str = "official_pgseg_state_dict_keys.tsv") -> dict:
    """Random tensors with exactly the names, shapes and dtypes of a released key list (default: the released
    checkpoint's, SPEC §7)."""
    state = {}
    for line in (reference_dir / name).read_text().splitlines():
        name, shape, dtype = line.split("\t")
        if skip_pgseg_only and ("downsample_spatial" in name or "mapping_text" in name
                                or name in ("img_encoder.logit_scale", "text_encoder.Atten.mu")):
            continue
        dims = [int(d) for d in shape.strip("()").split(",") if d.strip()]
        dt = getattr(torch, dtype.split(".")[-1])
        state[name] = torch.randn(dims).to(dt) if dt.is_floating_point else torch.zeros(dims, dtype=dt)
    return state


@pytest.mark.parametrize("source", ["pgseg-official", "groupvit-official"])
def test_released_key_list_converts_into_pgseg_vit_s(tmp_path, source, reference_dir):
    state = _from_released_key_list(reference_dir, skip_pgseg_only=source == "groupvit-official")
    path = tmp_path / "released.pth"
    torch.save({"model": state, "config": OmegaLike(model={"type": "MultiLabelContrastive"}), "amp": Apex(),
                "optimizer": {"state": {}}, "epoch": 30}, path)
    model = PGSeg.from_config(load_config("pgseg_vit_s", ["npr.mode=official"]))
    report = load_released(model, path, source)
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    if source == "pgseg-official":
        assert len(report.loaded) == 437 - 9 and len(report.dropped) == 9 and not report.expected_missing
        torch.testing.assert_close(model.img_encoder.layers[1].downsample_spatial.mu,
                                   state["img_encoder.layers.1.downsample_spatial.mu"])
    else:
        assert len(report.expected_missing) == 2 * 10 + 2
    torch.testing.assert_close(model.text_projector.linear_hidden[0].weight,
                               state["text_projector.linear_hidden.0.weight"][..., 0])


@pytest.mark.parametrize("layout", ["gcc_yfcc_30e", "gcc_redcap_30e"])
@pytest.mark.parametrize("multi_label", [0, 3])
def test_both_groupvit_release_layouts_initialise_a_pgseg_model(tmp_path, layout, multi_label):
    """The multi-label temperature is loaded when the model has that loss, dropped with a line when it does not,
    kept at init when the file has none; the file's other entries are listed, the config object never run."""
    state = groupvit_release_file(tmp_path / "groupvit.pth", layout)
    model = PGSeg.from_config(load_config("tiny", ["npr.mode=official", f"loss.multi_label={multi_label}"]))
    report = init_from_checkpoint(model, tmp_path / "groupvit.pth")
    assert report.ok, report.text()
    text = report.text()
    has_scale, wants_scale = layout == "gcc_yfcc_30e", multi_label > 0
    assert ("multi_label_logit_scale" in report.loaded) == (has_scale and wants_scale)
    assert ("multi_label_logit_scale" in report.dropped) == (has_scale and not wants_scale)
    assert ("multi_label_logit_scale" in report.expected_missing) == (wants_scale and not has_scale)
    assert ("multi-label loss temperature" in text) == (has_scale and not wants_scale)
    if has_scale and wants_scale:
        assert model.multi_label_logit_scale.item() == 2.5
    assert sorted(e.split(" ")[0] for e in report.ignored) == ["amp", "config", "epoch", "optimizer"]
    config_line = next(e for e in report.ignored if e.startswith("config"))
    assert "not executed" in config_line and "OmegaLike" in config_line and "config (" in text
    torch.testing.assert_close(model.img_encoder.pos_embed, state["img_encoder.pos_embed"])


def test_the_small_released_architecture_builds_the_fixture_key_list(reference_dir, tmp_path):
    """Without the released tensors: the fixture's plain-data build config (architecture.json) gives a model into
    which a file of the fixture's key list (names, shapes, dtypes) converts entry for entry (less the release's
    unused mapping_text), with the release's parameter count less mapping_text."""
    import json

    from pgseg.checkpoint import build_config_values

    arch = json.loads((reference_dir / "fixture_architecture.json").read_text())
    values = build_config_values({"config": {"model": arch["build_config"]}})
    assert values["model.image.embed_dim"] == 96
    model = PGSeg.from_config(load_config("pgseg_vit_s", values={**values, "npr.mode": "official"}))
    state = _from_released_key_list(reference_dir, name="fixture_state_dict_keys.tsv")
    assert len(state) == arch["num_state_dict_entries"]
    torch.save({"model": state}, tmp_path / "small.pth")
    report = load_released(model, tmp_path / "small.pth", "pgseg-official")
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    assert len(report.loaded) == 212 and len(report.dropped) == 9  # (as the released tensors themselves convert)
    mapping_text = sum(v.numel() for k, v in state.items() if k.startswith("img_encoder.mapping_text.")
                       and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert sum(p.numel() for p in model.parameters()) + mapping_text == arch["num_parameters"]
