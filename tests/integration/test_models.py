"""The session's tiny training run, tracked on a real `mlflow server`: its kept checkpoints are LoggedModels of the
run, the best by the dev set's mIoU is the registered model's champion; and `mlflow models serve` serves a champion
(of a model of the same architecture logged and registered the same way, whose masks vary) on 127.0.0.1 with the
masks `pgseg segment` writes."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from mlflow_process import wait_for_http
from PIL import Image
from processes import stop_group

from pgseg.checkpoint import read_model_config
from pgseg.train import STATE_FILE
from pipelines.models import download_model_file
from pipelines.runtime import free_port

NAME = "pgseg-tiny"
METRIC = "eval/val/mIoU"
SERVED = "pgseg-serve-check"  # the registered model of the served-masks test


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _request(image: bytes, classes: str, bg_thresh: float = 0.0) -> dict:
    return {"dataframe_split": {"columns": ["image", "classes"], "data": [[base64.b64encode(image).decode(), classes]]},
            "params": {"bg_thresh": bg_thresh}}


def _varied_model(config, images, classes, folder) -> str:
    """A model of ``config``'s architecture whose masks of ``images`` vary (three labels or more among them, two or
    more within one), so that comparing the served masks with the written ones compares something: the first
    varied one of seeded initial models, chosen in process. A 16-step model can give one label per image and the
    same one for all (CI's did, at every threshold), so the tiny run's champion cannot be relied on for this.
    Logged and registered the way a training run's kept checkpoints are (`log_kept_models`, `register_champion`):
    the name of its registered model."""
    import ray.train

    from pgseg.model import PGSeg
    from pgseg.segment import ProtocolSettings, Segmenter
    from pipelines.models import example_input, log_kept_models, register_champion

    for seed in range(16):
        torch.manual_seed(seed)
        model = PGSeg.from_config(config).eval()
        segmenter = Segmenter(model, classes, ProtocolSettings.of(config.eval, 0.0))
        labels = [set(segmenter(p).labels.unique().tolist()) for p in images]
        if len(set().union(*labels)) >= 3 and max(map(len, labels)) >= 2:
            break
    else:
        pytest.fail("none of 16 seeded models gives varied masks")
    folder.mkdir()
    torch.save({"model": model.state_dict(), "step": 0}, folder / STATE_FILE)  # a training state's layout
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment(SERVED), run_name=f"seed-{seed}")
    kept = log_kept_models(run.info.run_id, mlflow.get_tracking_uri(), [(ray.train.Checkpoint(str(folder)),
                                                                         {"step": 0})], config, *example_input())
    register_champion(kept, mlflow.get_tracking_uri(), SERVED, METRIC)
    return SERVED


def test_kept_checkpoints_are_models_of_the_run_and_the_best_is_champion(tiny_run, mlflow_server):
    result, storage = tiny_run
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert "pgseg.models_error" not in run.data.tags
    mlflow.set_tracking_uri(mlflow_server)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{result.run_id}'")
    kept = sorted((storage / "tiny").glob("checkpoint_step*"))
    assert len(models) == len(kept) >= 2  # one model per checkpoint Ray Train kept
    steps = sorted(int(m.params["step"]) for m in models)
    assert steps[-1] == result.step and len(set(steps)) == len(steps)
    points = client.get_metric_history(result.run_id, METRIC)
    history = {m.step: m.value for m in points}
    assert len(points) == len(history)  # one value per step: the models' figures are not logged into it again
    scored = {int(m.params["step"]): {k.removeprefix("metric."): float(v) for k, v in m.params.items()
                                      if k.startswith("metric.")} for m in models}
    for step, metrics in scored.items():
        if METRIC in metrics:  # the model's: the value the run has at that step (once: not logged again)
            assert metrics[METRIC] == pytest.approx(history[step], rel=1e-5)
    assert any(METRIC in metrics for metrics in scored.values())
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.run_id == result.run_id
    best = max((s for s in scored if METRIC in scored[s]), key=lambda s: (scored[s][METRIC], s))
    assert champion.tags["pgseg.step"] == str(best)
    model_id = champion.model_id or champion.source.removeprefix("models:/")
    assert client.get_logged_model(model_id).params["step"] == str(best), champion


def test_mlflow_models_serve_answers_with_the_masks_pgseg_segment_writes(tiny_run, mlflow_server, shapes_data,
                                                                          tmp_path, capsys):
    from jobs.segment import main as segment

    mlflow.set_tracking_uri(mlflow_server)
    champion = download_model_file(f"models:/{NAME}@champion", dst=tmp_path / "champion")
    images = sorted((shapes_data["val"]).rglob("*.jpg"))
    classes = ", ".join(shapes_data["world"].classes)
    served = _varied_model(read_model_config(champion), images, shapes_data["world"].classes, tmp_path / "state")
    weights = download_model_file(f"models:/{served}@champion", dst=tmp_path / "served")
    assert segment([*map(str, images), "--checkpoint", str(weights), "--classes", classes, "--bg-thresh", "0",
                    "--out", str(tmp_path / "seg")]) == 0
    expected = [np.asarray(Image.open(tmp_path / "seg" / f"{p.stem}_mask.png")) for p in images]
    assert len(np.unique(np.concatenate([m.ravel() for m in expected]))) >= 3  # not one label everywhere
    image_path = images[0]

    port = free_port()
    # the server runs `uvicorn` by name: the environment's bin folder on PATH, as in an activated virtualenv
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{served}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("wb"),
                            start_new_session=True)
    try:
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", proc, "mlflow models serve", 180)
        except BaseException:
            print((tmp_path / "serve.log").read_text()[-3000:], file=sys.stderr)
            raise
        request = _request(images[0].read_bytes(), classes, 0.0)
        request["dataframe_split"]["data"] = [[base64.b64encode(p.read_bytes()).decode(), classes] for p in images]
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", request)
        assert status == 200, answer
        from pipelines.models import decode_mask

        for row, mask, path in zip(answer["predictions"], expected, images, strict=True):
            np.testing.assert_array_equal(decode_mask(row["mask_png"]), mask)
            assert json.loads(row["labels"]) == ["background", *shapes_data["world"].classes]
            written = json.loads((tmp_path / "seg" / f"{path.stem}.json").read_text())["areas"]
            assert json.loads(row["areas"]) == pytest.approx(written)
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", _request(b"not an image", classes))
        assert status == 400 and "row 0" in json.dumps(answer), (status, answer)
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", _request(image_path.read_bytes(), " , "))
        assert status == 400 and "class list is empty" in json.dumps(answer), (status, answer)
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", _request(image_path.read_bytes(), classes, 2))
        assert status == 400 and "bg_thresh" in json.dumps(answer), (status, answer)
        status, _ = _post(f"http://127.0.0.1:{port}/invocations", _request(image_path.read_bytes(), classes))
        assert status == 200  # still serving after the bad requests
    finally:
        stop_group(proc)
