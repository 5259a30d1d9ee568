"""Safe at the edges, without Ray: every bad input a message and exit code 2, nothing of the user's replaced or
deleted unless asked, results that never collide, bounded memory on huge images, files with the user's umask, and
a command line whose help loads neither torch nor Ray and explains every option."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from jobs.cli import build_parser, main
from pgseg.checkpoint import CheckpointError, load_model, save_model
from pgseg.config import load_config
from pgseg.model import PGSeg

CLASSES = "circle, square, star"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    config = load_config("tiny")
    torch.manual_seed(0)
    return save_model(PGSeg.from_config(config), config, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def _segment(model_file: Path, *args: str) -> int:
    return main(["segment", "--checkpoint", str(model_file), "--classes", CLASSES, *map(str, args)])


def _picture(path: Path, size=(48, 40), colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_help_loads_neither_torch_nor_ray_and_every_option_is_explained():
    code = ("import sys; from jobs.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    unexplained = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
                unexplained.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")
            elif action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
                text = parser.formatter_class("x")._get_help_string(action)
                if "default" not in text:
                    unexplained.append(f"{prefix} {action.option_strings[0]} (default not shown)")

    walk(build_parser(), "pgseg")
    assert not unexplained, unexplained


def test_results_keep_each_input_apart_and_never_include_the_output_folder(model_file, tmp_path, capsys):
    inputs = tmp_path / "in"
    for name in ("a/x_2.png", "b/x.png", "b/x.jpg"):
        _picture(inputs / name)
    out = inputs / "results"  # inside the searched folder
    assert _segment(model_file, inputs, "--out", out) == 0
    records = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}
    assert sorted(records) == ["a/x_2.json", "b/x.jpg.json", "b/x.png.json"]
    assert {Path(r["image"]).relative_to(inputs.resolve()).as_posix() for r in records.values()} == \
        {"a/x_2.png", "b/x.png", "b/x.jpg"}
    assert "segmented 3 image(s)" in capsys.readouterr().out
    assert _segment(model_file, inputs, "--out", out, "--overwrite") == 0  # its own outputs are not inputs
    assert "segmented 3 image(s)" in capsys.readouterr().out


def test_existing_results_are_kept_unless_overwrite_or_resume(model_file, tmp_path, capsys):
    inputs = tmp_path / "in"
    _picture(inputs / "one.png")
    out = tmp_path / "out"
    assert _segment(model_file, inputs, "--out", out) == 0
    (out / "one.json").write_text("mine")
    _picture(inputs / "two.png")
    capsys.readouterr()
    assert _segment(model_file, inputs, "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "one.json").read_text() == "mine" and not (out / "two.json").exists()
    assert _segment(model_file, inputs, "--out", out, "--resume") == 0
    assert (out / "one.json").read_text() == "mine" and (out / "two.json").exists()
    assert "segmented 1 image(s)" in capsys.readouterr().out
    assert _segment(model_file, inputs, "--out", out, "--overwrite") == 0
    assert json.loads((out / "one.json").read_text())["width"] == 48


def test_bombs_and_files_over_the_limits_are_skipped_and_listed(model_file, tmp_path, capsys):
    inputs = tmp_path / "in"
    _picture(inputs / "fine.png")
    Image.new("1", (15000, 14000)).save(inputs / "bomb.png")  # 210 Mpx in a few KB
    _picture(inputs / "wide.png", size=(400, 300))
    assert (inputs / "bomb.png").stat().st_size < 100_000
    assert _segment(model_file, inputs, "--out", tmp_path / "out", "--max-pixels", 100_000) == 0
    captured = capsys.readouterr()
    assert "bomb.png" in captured.err and "wide.png" in captured.err and "over the limit" in captured.err
    assert "segmented 1 image(s)" in captured.out and "skipped 2" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fine.json", "fine_mask.png", "fine_overlay.png"]
    assert _segment(model_file, inputs / "fine.png", "--out", tmp_path / "out2", "--max-bytes", 10) == 1
    assert "MiB is over the limit" in capsys.readouterr().err


def test_huge_images_are_segmented_downscaled_with_full_size_masks(model_file, tmp_path, capsys):
    image = _picture(tmp_path / "in" / "big.png", size=(1200, 900))
    assert _segment(model_file, image, "--out", tmp_path / "out", "--work-pixels", 120_000) == 0
    record = json.loads((tmp_path / "out" / "big.json").read_text())
    assert (record["width"], record["height"]) == (1200, 900)
    assert record["segmented_at"][0] * record["segmented_at"][1] <= 120_000
    assert record["segmented_at"][0] / record["segmented_at"][1] == pytest.approx(1200 / 900, rel=0.01)
    assert Image.open(tmp_path / "out" / "big_mask.png").size == (1200, 900)
    assert sum(record["areas"].values()) == pytest.approx(1.0)
    assert "downscaled" in capsys.readouterr().out


def test_upscaled_labels_are_nearest_neighbour_and_areas_count_every_pixel():
    from pgseg.segment import label_areas, upscale_labels

    labels = torch.tensor([[0, 1], [2, 2]])
    big = upscale_labels(labels, (4, 6))
    assert big.tolist() == [[0, 0, 0, 1, 1, 1]] * 2 + [[2] * 6] * 2
    assert label_areas(big, ["background", "a", "b"]) == {"background": 0.25, "a": 0.25, "b": 0.5}


@pytest.mark.parametrize("args, message", [
    (["--bg-thresh", "7"], "bg_thresh: must be in [0, 1]"),
    (["--device", "gpu"], "not a device"),
    (["--device", "cuda:0"], "no CUDA GPU"),
    (["--max-pixels", "0"], "--max-pixels must be >= 1"),
])
def test_bad_segment_options_are_messages(model_file, tmp_path, capsys, args, message):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    image = _picture(tmp_path / "in" / "x.png")
    assert _segment(model_file, image, "--out", tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_or_cannot_be_written_is_a_message(model_file, tmp_path, capsys):
    image = _picture(tmp_path / "in" / "x.png")
    (tmp_path / "taken").write_text("a file of the user's")
    assert _segment(model_file, image, "--out", tmp_path / "taken") == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "a file of the user's"
    if os.geteuid() == 0:  # root writes through permissions: a folder no one can create
        unwritable = Path("/proc/pgseg-test-out")
    else:
        unwritable = tmp_path / "ro"
        unwritable.mkdir(mode=0o500)
    assert _segment(model_file, image, "--out", unwritable / "out") == 2
    assert "cannot write there" in capsys.readouterr().err


def test_a_random_model_says_why_everything_is_background(model_file, tmp_path, capsys):
    image = _picture(tmp_path / "in" / "x.png", size=(64, 64), colour=(90, 120, 60))
    assert _segment(model_file, image, "--out", tmp_path / "out") == 0  # random weights: background everywhere
    assert json.loads((tmp_path / "out" / "x.json").read_text())["areas"] == {"background": 1.0}
    assert "untrained" in capsys.readouterr().err
    assert _segment(model_file, image, "--out", tmp_path / "out", "--no-background", "--overwrite") == 0
    assert "untrained" not in capsys.readouterr().err
    labels = np.asarray(Image.open(tmp_path / "out" / "x_mask.png"))
    assert labels.max() <= 2  # 0-based class indices: no background label


def test_files_get_the_users_umask(model_file, tmp_path):
    from pgseg.fileio import atomic_write_bytes

    previous = os.umask(0o022)
    try:
        assert atomic_write_bytes(tmp_path / "shared.bin", b"x").stat().st_mode & 0o777 == 0o644
        _segment(model_file, _picture(tmp_path / "in" / "x.png"), "--out", tmp_path / "out")
        assert (tmp_path / "out" / "x_mask.png").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic_write_bytes(tmp_path / "private.bin", b"x").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_config_reads_a_model_file_and_refuses_binary_files(model_file, tmp_path, capsys):
    assert main(["config", str(model_file)]) == 0
    assert load_config(__import__("yaml").safe_load(capsys.readouterr().out)).model.image.embed_dim == \
        load_config("tiny").model.image.embed_dim
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    assert main(["config", str(tmp_path / "weights.bin")]) == 2
    assert "not a YAML text file" in capsys.readouterr().err


def test_a_model_whose_tensors_do_not_match_its_config_is_a_message(model_file, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(model_file), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = dict(fh.metadata())
    dim = load_config("tiny").model.image.embed_dim
    meta["config"] = meta["config"].replace(f"embed_dim: {dim}", f"embed_dim: {dim * 2}", 1)
    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="do not match its own stored config"):
        load_model(tmp_path / "odd.safetensors")
    assert _segment(tmp_path / "odd.safetensors", _picture(tmp_path / "x.png"), "--out", tmp_path / "out") == 2
    assert "do not match" in capsys.readouterr().err


def test_protocol_window_must_be_positive():
    from pgseg.segment import ProtocolSettings

    with pytest.raises(ValueError, match="window: must be >= 1"):
        ProtocolSettings(window=0, stride=0)


def test_data_sources_refuses_a_folder_holding_the_users_files(tmp_path, capsys):
    (tmp_path / "cc3m.tsv").write_text("a dog\thttp://h/1.jpg\n")
    out = tmp_path / "urls"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    assert main(["data", "sources", "--source", f"cc3m:{tmp_path / 'cc3m.tsv'}", "--out", str(out)]) == 2
    assert "thesis.tex" in capsys.readouterr().err and (out / "thesis.tex").read_text() == "mine"


def test_an_explicit_zero_background_threshold_is_kept(tmp_path):
    """A model whose config sets eval.bg_thresh: 0 keeps it (an `or` once turned it into 0.95: all background)."""
    config = load_config("tiny", ["eval.bg_thresh=0.0"])
    torch.manual_seed(0)
    model = save_model(PGSeg.from_config(config), config, tmp_path / "zero.safetensors")
    image = _picture(tmp_path / "in" / "x.png", size=(64, 64), colour=(90, 120, 60))
    assert _segment(model, image, "--out", tmp_path / "out") == 0
    assert "background" not in json.loads((tmp_path / "out" / "x.json").read_text())["areas"]


@pytest.mark.parametrize("address", ["closed", "ray://closed", "no-port", "127.0.0.1:99999"])
def test_a_cluster_that_does_not_answer_is_refused_before_any_work(tmp_path, capsys, monkeypatch, address):
    """A named cluster (--address, RAY_ADDRESS, an experiment's address) where nothing answers: exit 2 at once with
    the reason, before any stage writes (Ray's client would retry it for minutes after the data stages ran)."""
    from pipelines.runtime import free_port

    address = address.replace("closed", f"127.0.0.1:{free_port()}")  # a port nobody listens on
    workdir = tmp_path / "work"
    commands = [["train", "--address", address],
                ["sweep", "--config", str(REPO / "configs/sweeps/phi_tiny.yaml"), "--workdir", str(workdir),
                 "--address", address],
                ["quickstart", "--workdir", str(workdir), "--address", address],
                ["quickstart", "--workdir", str(workdir), "--set", f"address={address}"]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"--address {address}" in err and ("no Ray cluster answers" in err or "expected host:port" in err)
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert main(["eval", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert f"--address {address}" in capsys.readouterr().err
    assert not workdir.exists() or not any(workdir.rglob("*.json"))  # no stage ran, no manifest written
