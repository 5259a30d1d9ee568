"""`pgseg sweep` on real parts: a local Ray cluster on 127.0.0.1 running Ray Tune trials that each fit a Ray Train
TorchTrainer on shapes-world webdataset shards (made by img2dataset), a real MLflow server holding the sweep's
parent run, one child per trial and the summary table."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _base(tmp_path: Path, shapes_data: dict, uri: str | None, *, steps: int, experiment: str = "sweep-test",
          final: Path | None = None) -> Path:
    """A tiny training config on the shapes shards: ``steps`` steps of 16, the val set scored every 4 steps (with a
    checkpoint, which is when Tune hears of it); ``final``: a set scored once, by the final model."""
    config = {"base": "tiny",
              "data": {"shards": [str(shapes_data["shards"])], "batch_size": 16, "samples_per_epoch": 16 * steps,
                       "augment": False},
              "schedule": {"epochs": 1},
              "train": {"workers": 1, "cpus_per_worker": 0.5, "checkpoint_every": 4},
              "eval": {"datasets": [f"voc:{shapes_data['val']}"], "every_steps": 4, "bg_thresh": 0.0,
                       "final_datasets": [f"voc:{final}"] if final else []},
              "tracking": ({"uri": uri, "experiment": experiment, "log_every": 2} if uri else {"enabled": False})}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sweep(tmp_path: Path, name: str, base: Path, **spec) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": str(base), "workdir": str(tmp_path / "work"), **spec}))
    return path


def _children(client, experiment: str, parent: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def _summary(client, run_id: str) -> list[dict]:
    table = json.loads(Path(client.download_artifacts(run_id, "summary.json")).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_two_trial_grid_logs_children_and_a_summary_with_deltas(ray_local, shapes_data, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.data.shapes_world import write_voc_val
    from pipelines.tune import load_sweep, run_sweep

    # the metric: a set scored once, by each trial's final model (intermediate reports do not carry it)
    final = write_voc_val(shapes_data["world"], tmp_path / "final", 4, "dev")
    base = _base(tmp_path, shapes_data, mlflow_server, steps=8, final=final)
    spec = load_sweep(_sweep(tmp_path, "grid", base, metric="eval/final/mIoU", seeds=[0, 1]))
    lines: list[str] = []
    result = run_sweep(spec, printer=lines.append)
    assert "2 trial(s), at most 1 at a time" in lines[0]  # 0.5 worker CPU + 0.2 trainable + 1 for Ray Data on 2 CPUs
    assert [r.status for r in result.rows] == ["finished", "finished"]
    assert [r.values for r in result.rows] == [{"seed": 0}, {"seed": 1}]
    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["pgseg.sweep"] == "grid"
    children = _children(client, "sweep-test", result.run_id)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    by_seed = {int(c.data.params["trial.seed"]): c for c in children}  # a sweep's seed is the model's and the data's
    assert set(by_seed) == {0, 1} and by_seed[1].data.params["train.seed"] == by_seed[1].data.params["data.seed"] == "1"
    # the summary read back from MLflow: one row per trial, mIoU as the children logged it, deltas against row 0
    rows = _summary(client, result.run_id)
    assert [r["seed"] for r in rows] == [0, 1]
    finals = {}
    for seed, child in by_seed.items():
        history = client.get_metric_history(child.info.run_id, "eval/val/mIoU")
        assert sorted(m.step for m in history) == [4, 8]
        (last,) = client.get_metric_history(child.info.run_id, "eval/final/mIoU")
        assert last.step == 8
        finals[seed] = 100 * last.value
    assert rows[0]["final mIoU"] == pytest.approx(finals[0], abs=0.006)
    assert rows[1]["final mIoU"] == pytest.approx(finals[1], abs=0.006)
    assert rows[0]["Δ final mIoU"] == 0.0
    assert rows[1]["Δ final mIoU"] == pytest.approx(finals[1] - finals[0], abs=0.011)
    assert rows[0]["steps"] == "8/8" and rows[1]["status"] == "finished"
    # over the seeds: the mean of the two final values, its std and 95 % interval (one point, so no pairs)
    table = json.loads(Path(client.download_artifacts(result.run_id, "summary_seeds.json")).read_text())
    (stats,) = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert stats["runs"] == 2 and stats["diverged"] == 0 and stats["pairs"] is None
    assert stats["final mIoU mean"] == pytest.approx((finals[0] + finals[1]) / 2, abs=0.006)
    assert stats["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5, abs=0.01)
    if stats["std"] > 0:
        assert stats["CI95 low"] < min(finals.values()) and stats["CI95 high"] > max(finals.values())
    markdown = Path(client.download_artifacts(result.run_id, "summary.md")).read_text()
    assert "| seed |" in markdown and "| final mIoU mean |" in markdown
    assert [a.path for a in client.list_artifacts(result.run_id, "plots")] == ["plots/seeds.png"]
    best = max(result.rows, key=lambda r: r.last["eval/final/mIoU"])
    assert parent.data.tags["pgseg.best_trial"] == best.label
    # run again: Tune's state says every trial ended, nothing is trained again
    mtimes = {p: p.stat().st_mtime_ns for p in (spec.root / "runs").rglob("*") if p.is_file()}
    again = run_sweep(spec, printer=lines.append)
    assert "resuming" in lines[-1] and [r.status for r in again.rows] == ["finished", "finished"]
    assert {p: p.stat().st_mtime_ns for p in (spec.root / "runs").rglob("*") if p.is_file()} == mtimes
    assert len(_children(client, "sweep-test", result.run_id)) == 2


def test_asha_stops_a_diverging_trial_early(ray_local, shapes_data, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tune import load_sweep, run_sweep

    base = _base(tmp_path, shapes_data, mlflow_server, steps=16, experiment="sweep-asha")
    # lr 1e4 diverges at once; non-finite steps are skipped (train.nonfinite=skip), so only the scheduler stops it
    spec = load_sweep(_sweep(tmp_path, "asha", base, set=["train.nonfinite=skip"], metric="loss", mode="min",
                             space={"optim.lr": {"grid": [1e-3, 1e4]}}, scheduler="asha",
                             asha={"grace_steps": 4, "reduction_factor": 2}))
    result = run_sweep(spec, printer=lambda _: None)
    good, bad = result.rows
    assert good.values == {"optim.lr": 1e-3} and good.status == "finished" and good.step == 16
    assert bad.values == {"optim.lr": 1e4} and bad.status == "stopped early" and bad.step < 16
    client = MlflowClient(mlflow_server)
    runs = {r.data.params["trial.optim.lr"]: r for r in _children(client, "sweep-asha", result.run_id)}
    assert runs["0.001"].info.status == "FINISHED"
    stopped = runs["10000.0"]
    assert stopped.info.status == "KILLED" and "asha scheduler at step" in stopped.data.tags["pgseg.state"]
    assert max(m.step for m in client.get_metric_history(stopped.info.run_id, "grad_norm")) < 16
    assert result.best is good
    # the control: the same diverging trial without a scheduler trains to the end (nothing else would stop it)
    from pipelines.train import fit, plan_training

    control = fit(plan_training(spec.config({"optim.lr": 1e4, "train.name": "control", "tracking.enabled": False,
                                             "train.storage_path": str(tmp_path / "control")})))
    assert control.finished and control.step == 16 and control.metrics["nonfinite_steps"] > 0


def test_a_failed_trial_ends_its_run_failed_with_the_reason(ray_local, shapes_data, mlflow_server, tmp_path):
    """The sweep, not the trial's training, ends a failed trial's MLflow run (a trial stopped by the scheduler fails
    as its actor dies, and its own late FAILED would overwrite the sweep's KILLED): the run still ends FAILED and
    says why."""
    from mlflow.tracking import MlflowClient

    from pipelines.tune import load_sweep, run_sweep

    base = _base(tmp_path, shapes_data, mlflow_server, steps=4, experiment="sweep-fails")
    spec = load_sweep(_sweep(tmp_path, "fails", base, set=["train.nonfinite=stop"], metric="loss", mode="min",
                             space={"optim.lr": {"grid": [1e4]}}))
    result = run_sweep(spec, printer=lambda _: None)
    (row,) = result.rows
    assert row.status == "failed" and "non-finite loss" in row.error
    client = MlflowClient(mlflow_server)
    (run,) = _children(client, "sweep-fails", result.run_id)
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["pgseg.error"]
    assert client.get_run(result.run_id).info.status == "FAILED"
    # the same sweep again: the failed trial is tried once more, in the same parent run, whose summary is replaced
    again = run_sweep(spec, printer=lambda _: None)
    assert again.run_id == result.run_id and [r.status for r in again.rows] == ["failed"]
    assert [r["status"] for r in _summary(client, result.run_id)] == ["failed"]


def test_a_sweep_survives_training_workers_killed_at_random(ray_local, shapes_data, mlflow_server, tmp_path):
    """Chaos: during a 2-trial sweep, up to 3 Ray Train worker processes, picked by a seeded generator at seeded
    moments (bounded in count and time), are SIGKILLed. Each trial restarts its worker from its latest checkpoint
    (train.max_failures); every trial finishes, every trial's MLflow run ends FINISHED with each step logged once."""
    import random
    import threading

    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from pipelines.tune import load_sweep, run_sweep

    base = _base(tmp_path, shapes_data, mlflow_server, steps=8, experiment="sweep-chaos")
    spec = load_sweep(_sweep(tmp_path, "chaos", base, metric="eval/val/mIoU",
                             set=["train.max_failures=3", "train.checkpoint_every=2"],
                             space={"train.seed": {"grid": [0, 1]}}))
    rng, killed, stop = random.Random(15), [], threading.Event()
    # this session's cluster by name: without an address the state API asks the machine's latest `ray start`ed one
    cluster = ray_local.get_runtime_context().gcs_address

    def chaos() -> None:
        deadline = time.monotonic() + 600
        while not stop.is_set() and len(killed) < 3 and time.monotonic() < deadline:
            stop.wait(rng.uniform(5, 15))
            workers = sorted(a.pid for a in list_actors(cluster, filters=[("class_name", "=", "RayTrainWorker"),
                                                                           ("state", "=", "ALIVE")]) if a.pid)
            if workers and not stop.is_set():
                pid = rng.choice(workers)
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        result = run_sweep(spec, printer=lambda _: None)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert 1 <= len(killed) <= 3
    assert [(r.status, r.step) for r in result.rows] == [("finished", 8)] * 2
    client = MlflowClient(mlflow_server)
    children = _children(client, "sweep-chaos", result.run_id)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(steps) == list(range(2, 9, 2)), steps  # log_every=2: each step once, none lost


def _cli(args: list[str], extra_env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "jobs.sweep", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def _interrupted_once_a_trial_ends(args: list[str], how: str, extra_env: dict[str, str] | None = None) -> str:
    """Run the sweep's CLI until a trial ends, then send it ``how`` (SIGINT: Ctrl+C; SIGKILL); its whole output."""
    proc = _cli(args, extra_env, start_new_session=True)
    output, deadline = [], time.monotonic() + 400
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("[sweep]") and line.rstrip().endswith(" ended"):
                os.kill(proc.pid, getattr(signal, how))
                break
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(output) + rest
    expected = 130 if how == "SIGINT" else -signal.SIGKILL
    assert proc.returncode == expected, text[-3000:]
    return text


def _started(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[sweep]") and line.endswith(" started")]


def test_an_interrupted_sweep_resumes_only_its_unfinished_trials(ray_local, shapes_data, mlflow_server, tmp_path):
    """The job as `ray job submit` runs it: a driver attached to a running cluster (--address), cut once a trial has
    ended and started again, twice: first with Ctrl+C (SIGINT: Tune saves its state), then with SIGKILL (nothing
    saved at that moment: Tune restores what it last wrote, which here is only what it wrote when it started, so
    the trial that ended since is restored as unfinished and must give its result without training again)."""
    from mlflow.tracking import MlflowClient

    experiment = "sweep-resume"
    base = _base(tmp_path, shapes_data, mlflow_server, steps=8, experiment=experiment)
    path = _sweep(tmp_path, "resume", base, metric="eval/val/mIoU",
                  variants=[{"name": "GroupViT", "set": {"npr.enabled": False, "npr.i_npr": False,
                                                          "npr.t_npr": False, "npr.hrs": False}},
                            {"name": "+I-NPR", "set": {"npr.t_npr": False, "npr.hrs": False}},
                            {"name": "PGSeg", "set": {}}])
    root = tmp_path / "work" / "sweeps" / "resume"
    args = ["--config", str(path), "--address", ray_local.get_runtime_context().gcs_address]

    def ended() -> set[str]:
        return {p.stem for p in (root / "ended").glob("*.json")}

    def files(trial: str) -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in (root / "runs" / f"trial_{trial}").rglob("*") if p.is_file()}

    first = _interrupted_once_a_trial_ends(args, "SIGINT")
    assert "interrupted: 1 of 3 trial(s) ended" in first
    (a,) = ended()
    assert (root / "runs" / f"trial_{a}" / "model.safetensors").is_file()
    kept = {a: files(a)}
    # again, now cut by SIGKILL once the next trial has ended (Tune saves its state only when it starts)
    second = _interrupted_once_a_trial_ends(args, "SIGKILL", {"TUNE_GLOBAL_CHECKPOINT_S": "100000"})
    started = _started(second)
    assert len(started) == 1 and a not in started[0], started  # the ended trial is not run again
    (b,) = ended() - {a}
    assert {a: files(a)} == kept
    kept[b] = files(b)
    # the same command once more: only the last trial trains; the one that ended unseen by Tune gives its result
    third = _cli(args)
    out, _ = third.communicate(timeout=600)
    assert third.returncode == 0, out[-3000:]
    started = _started(out)
    assert len(started) == 1 and a not in started[0] and b not in started[0], started
    assert any(b in line and "had ended" in line for line in out.splitlines()), out[-3000:]
    assert {trial: files(trial) for trial in kept} == kept  # nothing of the ended trials rewritten
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`pgseg.sweep_key` LIKE 'sweep:%'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    rows = _summary(client, parents[0].info.run_id)
    assert [(r["trial"], r["status"], r["steps"]) for r in rows] == [("GroupViT", "finished", "8/8"),
                                                                     ("+I-NPR", "finished", "8/8"),
                                                                     ("PGSeg", "finished", "8/8")]
    children = _children(client, experiment, parents[0].info.run_id)
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:  # each step logged once, also for a trial that was cut and continued
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert steps == sorted(set(steps)) and max(steps) == 8


@pytest.mark.parametrize("spec, message", [
    ({"space": {"npr.phii": {"grid": [0.1, 0.2]}}}, "space.npr.phii: npr.phii: unknown key"),
    ({"space": {}}, "space: the search space is empty"),
    ({"space": {"npr.phi": {"grid": [0.1]}}, "metric": "eval/voc/mIoU"}, "metric: eval/voc/mIoU names eval set 'voc'"),
    ({"space": {"npr.phi": {"grid": [0.1]}}, "trainable_cpus": 1.0}, "trainable_cpus: a trial takes 1 worker(s)"),
])
def test_bad_sweep_fails_before_any_trial(ray_local, shapes_data, tmp_path, spec, message, capsys):
    from jobs.sweep import main

    base = _base(tmp_path, shapes_data, None, steps=8)
    assert main(["--config", str(_sweep(tmp_path, "bad", base, **{"metric": "eval/val/mIoU", **spec}))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work" / "sweeps" / "bad" / "tune").exists()
    assert not (tmp_path / "work" / "sweeps" / "bad" / "runs").exists()


def test_summary_deltas_follow_the_baseline_variant_at_the_same_grid_point(tmp_path):
    from pipelines.tune import TrialRow, load_sweep, markdown, summary_table

    spec = load_sweep(_sweep(tmp_path, "t", Path("tiny"), space={"npr.phi": {"grid": [0.1, 0.3]}},
                             variants=[{"name": "off", "set": {"npr.hrs": False}}, {"name": "on", "set": {}}],
                             baseline="off", metric="eval/a/mIoU"))
    values = {("off", 0.1): 0.30, ("off", 0.3): 0.20, ("on", 0.1): 0.35, ("on", 0.3): 0.31}
    rows = [TrialRow(f"{v}{p}", v, f"{v} npr.phi={p}", {"npr.phi": p}, "finished", 8, 8,
                     {"eval/a/mIoU": m, "eval/b/mIoU": m / 2}, m) for (v, p), m in values.items()]
    table = summary_table(spec, rows, ["a", "b"])
    assert [(r["variant"], r["npr.phi"]) for r in table] == list(values)
    deltas = {(r["variant"], r["npr.phi"]): (r["Δ a mIoU"], r["Δ b mIoU"]) for r in table}
    assert deltas[("on", 0.1)] == pytest.approx((5.0, 2.5)) and deltas[("on", 0.3)] == pytest.approx((11.0, 5.5))
    assert deltas[("off", 0.3)] == (0.0, 0.0)
    assert table[2]["a mIoU"] == 35.0 and table[2]["best a mIoU"] == 35.0
    rows[3].last["eval/a/mIoU"] = float("nan")  # a diverged trial: shown, no delta
    table = summary_table(spec, rows, ["a", "b"])
    assert table[3]["Δ a mIoU"] is None and "| nan |" in markdown(table)
