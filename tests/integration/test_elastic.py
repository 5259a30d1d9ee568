"""Elastic training on real parts: a 3-node Ray cluster on 127.0.0.1 (tests/elastic_drill.py) trains with
train.workers [1, 2]; a worker node is removed mid-run and added again. The run goes on with one worker from the last
complete checkpoint, grows back to two, and finishes its schedule: the global batch, the learning rate and the data
position (in global batches) never change with the number of workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgseg.config import ConfigError, load_config
from pgseg.train import learning_rate
from pipelines.train import plan_training
from training_runs import checkpoint_state, history

REPO = Path(__file__).resolve().parents[2]
DRILL_S = 900


def test_elastic_workers_are_checked_and_keep_the_global_batch(shapes_data, tmp_path):
    """[min, max] keeps data.batch_size × max images per step at every world size (each rank takes its share), so
    the schedule and the learning rate are those of a fixed run at max workers; a batch that some world size in the
    range cannot split is refused, naming the key and the multiple that works."""
    sets = [f"data.shards=[{shapes_data['shards']}]", f"train.storage_path={tmp_path}", "schedule.epochs=2"]
    elastic = plan_training(load_config("tiny", [*sets, "train.workers=[1, 3]", "data.batch_size=8"]))
    fixed = plan_training(load_config("tiny", [*sets, "train.workers=3", "data.batch_size=8"]))
    assert elastic.global_batch == fixed.global_batch == 24
    assert (elastic.steps_per_epoch, elastic.total_steps) == (fixed.steps_per_epoch, fixed.total_steps) == (21, 42)
    assert [elastic.config.rank_batch(w) for w in (1, 2, 3)] == [24, 12, 8]
    assert [fixed.config.rank_batch(w) for w in (1, 2, 3)] == [8, 8, 8]  # a fixed run: data.batch_size per rank
    assert [learning_rate(elastic.config, 21, s, elastic.global_batch) for s in range(43)] == \
           [learning_rate(fixed.config, 21, s, fixed.global_batch) for s in range(43)]
    with pytest.raises(ConfigError, match=r"data.batch_size: .* 3 workers; .* a multiple of 3"):
        load_config("tiny", ["train.workers=[2, 4]", "data.batch_size=16"])
    for bad in ("[0, 2]", "[3, 2]", "[1, 2, 3]", "[]"):
        with pytest.raises(ConfigError, match="train.workers"):
            load_config("tiny", [f"train.workers={bad}"])
    with pytest.raises(ConfigError, match="train.elastic_check_s"):
        load_config("tiny", ["train.elastic_check_s=0"])


def test_a_node_lost_and_regained_mid_run(shapes_data, mlflow_server, tmp_path):
    epochs, every = 4, 4
    config = {"base": "tiny",
              "data": {"shards": [str(shapes_data["shards"])], "batch_size": 16, "augment": False},
              "schedule": {"epochs": epochs, "warmup_epochs": 0.25},
              "train": {"workers": [1, 2], "cpus_per_worker": 2, "checkpoint_every": every, "keep_checkpoints": 100,
                        "max_failures": 3, "elastic_check_s": 5, "shared_storage": True, "deterministic": True,
                        "storage_path": str(tmp_path / "runs"), "name": "elastic"},
              "tracking": {"uri": mlflow_server, "experiment": "elastic", "log_every": 1}}
    path = tmp_path / "elastic.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "elastic_drill.py"), str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=DRILL_S)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert "drill_error" not in out and "error" not in out, (out, proc.stderr[-3000:])
    plan = plan_training(load_config(path))
    total, spe = plan.total_steps, plan.steps_per_epoch
    assert out["result"]["finished"] and out["result"]["step"] == total == epochs * 16
    removed, added, grown = out["events"]
    run_id = out["result"]["run_id"]
    # where each new worker group started: the last complete checkpoint of two workers, then of one
    first, second = (int(v) for _, v in history(mlflow_server, run_id, "resumed_from_step"))
    assert first in [s for s, w in removed["stored"] if w == 2] and first >= every
    assert second in [s for s, w in added["stored"] if w == 1] or second in [s for s, w in grown["stored"] if w == 1]
    # every checkpoint was written by the workers there were at its step: two up to the loss, one until the group
    # grew back, two again to the end
    checkpoints = out["checkpoints"]
    assert [s for s, _ in checkpoints] == list(range(every, total + 1, every))
    assert [w for s, w in checkpoints] == [2 if s <= first or s > second else 1 for s, _ in checkpoints]
    assert first < second < total and any(w == 1 for _, w in checkpoints)
    # the rules: the global batch (data.batch_size × max workers) at every step, the learning rate of the planned
    # schedule at every step, each step logged once, the data position at each checkpoint in global batches
    assert set(v for _, v in history(mlflow_server, run_id, "global_batch")) == {32.0}
    assert [s for s, _ in history(mlflow_server, run_id, "loss")] == list(range(1, total + 1))
    lrs = history(mlflow_server, run_id, "lr")  # (the rate step s trained with, set before it: the schedule at s - 1)
    assert [s for s, _ in lrs] == list(range(1, total + 1))
    assert [v for _, v in lrs] == pytest.approx([learning_rate(plan.config, spe, s - 1, 32) for s, _ in lrs], rel=1e-6)
    workers = [v for _, v in history(mlflow_server, run_id, "workers")]
    changes = [v for i, v in enumerate(workers) if i == 0 or workers[i - 1] != v]
    assert changes == [2.0, 1.0, 2.0]
    run_dir = tmp_path / "runs" / "elastic"
    for step, _ in checkpoints:
        state = checkpoint_state(run_dir / f"checkpoint_step{step:09d}")
        assert (state["data_pass"], state["batches_in_pass"]) == (step // spe, step % spe), step
