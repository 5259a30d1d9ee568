"""Fault drills of training on a real local Ray cluster, each against an uninterrupted reference: workers SIGKILLed
after a step, inside a step and while a checkpoint is written; a run stopped and resumed without reproducible
settings; the MLflow server stopped and started again mid-run; a tracking server that never answers."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from mlflow_process import MlflowServer
from pgseg.config import ConfigError
from pgseg.train import RANK_FILE, STATE_FILE, learning_rate, load_state
from pipelines.train import fit, plan_training
from training_runs import checkpoint_state, history, tiny_config

REPRODUCIBLE = ["train.deterministic=true", "data.augment=false", "train.checkpoint_every=4", "schedule.epochs=1",
                "data.batch_size=32"]  # 16 steps on one worker, 8 per pass on two: 16 with schedule.epochs=2


def _same_state(a: dict, b: dict) -> None:
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name], b["optimizer"]["state"][index][name]), (index, name)


def _one_run(uri: str, suffix: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pgseg").experiment_id],
                              filter_string=f"tags.`pgseg.run_key` LIKE '%/{suffix}'")
    assert len(runs) == 1
    return runs[0]


def test_two_workers_stopped_then_killed_mid_step_and_mid_checkpoint_end_like_an_uninterrupted_run(
        ray_local, shapes_data, tmp_path, mlflow_server, monkeypatch):
    """Two workers, reproducible settings. The run is stopped after step 4 and started again by name; rank 1 is
    SIGKILLed inside step 7's backward pass (rank 0 waits in the all-reduce) → restart from step 4; then while the
    step-12 checkpoint is written (rank 0's files may be in storage, rank 1's never come) → restart from step 8, the
    last complete checkpoint. At step 16 model, optimiser and schedule equal the uninterrupted run's, MLflow holds
    one run with one value per step, and keep_checkpoints=2 leaves exactly two complete checkpoints."""
    sets = [*REPRODUCIBLE, "train.workers=2", "schedule.epochs=2", "train.max_failures=2",
            "train.keep_checkpoints=2"]
    reference = fit(plan_training(tiny_config(shapes_data, tmp_path, *sets, "train.name=reference",
                                              tracking=mlflow_server)))
    first = fit(plan_training(tiny_config(shapes_data, tmp_path, *sets, "train.name=drill", "train.stop_after=4",
                                          tracking=mlflow_server)))
    assert (first.step, first.finished) == (4, False)
    monkeypatch.setenv("PGSEG_FAULT_INJECT", "killmid@7:1,killsave@12:1")
    second = fit(plan_training(tiny_config(shapes_data, tmp_path, *sets, "train.name=drill", tracking=mlflow_server)))
    faults = tmp_path / "runs" / "drill" / ".faults"
    assert sorted(p.name for p in faults.iterdir()) == ["killmid-7-1", "killsave-12-1"]  # both drills fired
    assert second.finished and second.step == reference.step == 16 and second.run_id == first.run_id
    _same_state(checkpoint_state(reference.checkpoint), checkpoint_state(second.checkpoint))
    # where each start resumed from: the stop (4), the kill in step 7 (4), the kill while checkpointing 12 (8)
    assert [v for _, v in history(mlflow_server, second.run_id, "resumed_from_step")] == [4.0, 4.0, 8.0]
    run = _one_run(mlflow_server, "drill")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(mlflow_server, second.run_id, "loss")] == list(range(1, 17))
    assert history(mlflow_server, second.run_id, "lr") == history(mlflow_server, reference.run_id, "lr")
    # the same samples at every step (each pass has its own shard order: a resume in the wrong pass shows here)
    assert history(mlflow_server, second.run_id, "loss") == history(mlflow_server, reference.run_id, "loss")
    assert history(mlflow_server, second.run_id, "epoch")[-1] == (16, 2.0)
    kept = sorted(p for p in (tmp_path / "runs" / "drill").iterdir() if p.name.startswith("checkpoint_step"))
    assert [p.name for p in kept] == ["checkpoint_step000000012", "checkpoint_step000000016"]
    for folder in kept:  # complete: the training state and both ranks' files load
        assert {STATE_FILE, RANK_FILE.format(rank=0), RANK_FILE.format(rank=1)} <= {p.name for p in folder.iterdir()}
        state, rng = load_state(folder, rank=1)
        assert state["step"] == int(folder.name[-9:]) and rng is not None
    # the data position: 4 batches into the second pass at 12; at 16 the second pass done, the next one to read
    assert [(s["data_pass"], s["batches_in_pass"]) for s in map(checkpoint_state, kept)] == [(1, 4), (2, 0)]


def test_resume_without_reproducible_settings_keeps_step_schedule_and_epoch(ray_local, shapes_data, tmp_path):
    """Without train.deterministic the data order is not replayed: a resumed run reads the interrupted pass again
    from its start in a new order (its samples may come twice). Step, learning rate and epoch are exact: the
    schedule follows the step, not the data."""
    sets = ["train.checkpoint_every=4", "data.batch_size=32", "schedule.epochs=1", "train.name=loose"]
    config = tiny_config(shapes_data, tmp_path, *sets)
    first = fit(plan_training(tiny_config(shapes_data, tmp_path, *sets, "train.stop_after=6")))
    assert (first.step, first.finished) == (6, False)
    resumed = fit(plan_training(config))
    uri = config.tracking.uri
    assert resumed.finished and resumed.step == 16 and resumed.run_id == first.run_id
    assert checkpoint_state(resumed.checkpoint)["step"] == 16
    lr = history(uri, resumed.run_id, "lr")
    assert [s for s, _ in lr] == list(range(1, 17))
    steps_per_epoch = plan_training(config).steps_per_epoch
    for step, value in lr:  # logged with the count of steps done: the rate the last one used
        assert value == pytest.approx(learning_rate(config, steps_per_epoch, step - 1, 32), rel=1e-6)
    assert history(uri, resumed.run_id, "epoch")[5] == (6, 6 / 16) and history(uri, resumed.run_id, "epoch")[-1] == (16, 1.0)
    assert history(uri, resumed.run_id, "resumed_from_step") == [(6, 6.0)]


def test_tracking_server_stopped_mid_run_loses_nothing_and_the_run_finishes(ray_local, shapes_data, tmp_path):
    """The MLflow server is stopped once training has logged step 4, and started again (same port and database)
    once the step-8 checkpoint exists: training never waits for it, the values logged while it was away arrive when
    it is back, every step is on the curve once, nothing is reported lost and the run ends FINISHED."""
    server = MlflowServer(tmp_path / "mlflow").start()
    config = tiny_config(shapes_data, tmp_path, "train.checkpoint_every=4", "data.batch_size=32", "schedule.epochs=2",
                         "train.name=outage", tracking=server.uri)
    plan = plan_training(config)
    outage: dict[str, float] = {}

    def drill() -> None:
        client, deadline = MlflowClient(server.uri), time.monotonic() + 300
        while time.monotonic() < deadline and "down" not in outage:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and max((m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")), default=0) >= 4:
                server.stop()
                outage["down"] = time.time()
            time.sleep(0.5)
        checkpoint = tmp_path / "runs" / "outage" / "checkpoint_step000000008"
        while time.monotonic() < deadline and not checkpoint.is_dir():
            time.sleep(0.2)
        outage["trained_on"] = float(checkpoint.is_dir())
        server.start()
        outage["up"] = time.time()

    thread = threading.Thread(target=drill, daemon=True)
    thread.start()
    try:
        result = fit(plan)
    finally:
        thread.join(timeout=360)
        if server.proc is None:
            server.start()
    try:
        assert outage.get("trained_on") == 1.0 and outage["down"] < outage["up"]
        assert result.finished and result.step == plan.total_steps == 32
        assert result.metrics["tracking/failed_sends"] > 0  # rank 0 did meet the outage
        assert (result.metrics["tracking/unsent"], result.metrics["tracking/dropped"]) == (0, 0)
        client = MlflowClient(server.uri)
        loss = client.get_metric_history(result.run_id, "loss")
        assert sorted(m.step for m in loss) == list(range(1, 33))
        away = [m.step for m in loss if outage["down"] * 1000 < m.timestamp < outage["up"] * 1000]
        assert away, "no step was logged while the server was away"
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["pgseg.metrics_unsent"] == "0"
    finally:
        server.stop()


def test_a_tracking_server_that_never_answers_is_named_before_any_work(ray_local, shapes_data, tmp_path):
    config = tiny_config(shapes_data, tmp_path, "train.name=nowhere", tracking="http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"tracking.uri: no MLflow server answers at http://127.0.0.1:9"):
        fit(plan_training(config))
    assert time.monotonic() - started < 30 and not (tmp_path / "runs").exists()
