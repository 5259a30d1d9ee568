"""Training on Ray Train V2 with real parts: a local Ray cluster on 127.0.0.1, shapes-world shards made by
img2dataset, a real `mlflow server`, and (in test_train_job.py) `ray start --head` + `ray job submit`."""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pgseg.config import ConfigError, load_config
from pgseg.distributed import Collectives
from pgseg.train import TrainStep, build_optimizer, learning_rate, parameter_groups
from pipelines.runtime import check_resources
from pipelines.train import TrainingError, fit, parse_faults, plan_training
from training_runs import checkpoint_state, history, tiny_config

# ------------------------------------------------------------------------------------------------ unit level
def test_no_weight_decay_on_1d_parameters_and_biases():
    from pgseg.model import PGSeg

    model = PGSeg.from_config(load_config("tiny"))
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert "logit_scale" in {names[id(p)] for p in no_decay["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert len(build_optimizer(model, load_config("tiny"), 32).param_groups) == 2


def test_schedule_warms_up_per_step_then_cosine_from_step_zero():
    config = load_config("official")  # 10 warm-up epochs from 1e-6, cosine to 1e-5 over 30 epochs, lr 1e-4
    spe, batch = 100, 4096  # the presets' global batch: their rates as given
    assert learning_rate(config, spe, 0, batch) == pytest.approx(1e-6)
    assert learning_rate(config, spe, 500, batch) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    # after warm-up the cosine is the one started at step 0 (the released timing), not a fresh one
    t = 1500 / 3000
    assert learning_rate(config, spe, 1500, batch) == pytest.approx(
        1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + math.cos(math.pi * t)))
    assert learning_rate(config, spe, 3000, batch) == pytest.approx(1e-5)
    paper = load_config("paper")
    assert learning_rate(paper, spe, 500, batch) == pytest.approx(1.6e-3 * 0.5 * (1 + math.cos(math.pi * 500 / 4000)) +
                                                           1e-5 * 0.5 * (1 - math.cos(math.pi * 500 / 4000)), rel=1e-6)
    assert paper.npr.start_epoch == 30 and load_config("official").npr.resolved().matching == "min_similarity"


def test_the_schedule_follows_the_global_batch_not_the_worker_count(shapes_data, tmp_path):
    """lr, warmup_lr and min_lr are given for optim.batch_ref images: 1 worker × 32 and 2 workers × 16 have the same
    steps and the same rate at every step; 2 workers × 32 (twice the batch) have half the steps per epoch, the same
    warm-up in samples, and rates × 2 (linear, GroupViT's), × √2 (sqrt) or × 1 (none), in the step too."""
    def plan(*sets):
        return plan_training(tiny_config(shapes_data, tmp_path, "schedule.epochs=2", "schedule.warmup_epochs=0.5",
                                         "optim.batch_ref=32", *sets))

    def rates(p):
        return [learning_rate(p.config, p.steps_per_epoch, s, p.global_batch) for s in range(p.total_steps + 1)]

    one, two = plan("train.workers=1", "data.batch_size=32"), plan("train.workers=2", "data.batch_size=16")
    assert (one.steps_per_epoch, one.total_steps) == (two.steps_per_epoch, two.total_steps) == (16, 32)
    assert rates(one) == rates(two)
    for scaling, factor in (("linear", 2.0), ("sqrt", math.sqrt(2.0)), ("none", 1.0)):
        big = plan("train.workers=2", "data.batch_size=32", f"optim.lr_scaling={scaling}")
        assert (big.steps_per_epoch, big.total_steps) == (8, 16)
        # step k of the big run is sample k × 64 = step 2k of the small one
        assert rates(big) == pytest.approx([factor * r for r in rates(one)[::2]], rel=1e-9)
        step = TrainStep(big.config, big.steps_per_epoch, world=Collectives(rank=0, world=2))
        assert step.optimizer.param_groups[0]["lr"] == pytest.approx(factor * big.config.schedule.warmup_lr)


def test_fault_spec_is_parsed_and_checked():
    assert parse_faults("kill@5:1,nan@3") == {"kill": (5, 1), "nan": (3, 0)}
    assert parse_faults("killmid@7:1,killsave@12") == {"killmid": (7, 1), "killsave": (12, 0)}
    assert parse_faults(None) == {}
    with pytest.raises(ValueError, match="PGSEG_FAULT_INJECT"):
        parse_faults("explode@3")


def test_plan_errors_name_the_key(shapes_data, tmp_path):
    with pytest.raises(ConfigError, match="data.shards"):
        plan_training(load_config("tiny"))
    with pytest.raises(ConfigError, match="data.shards"):
        plan_training(load_config("tiny", [f"data.shards=[{tmp_path / 'nothing'}/*.tar]"]))
    with pytest.raises(ConfigError, match="data.batch_size"):
        plan_training(tiny_config(shapes_data, tmp_path, "data.batch_size=600"))
    with pytest.raises(ConfigError, match="train.init_from"):
        plan_training(tiny_config(shapes_data, tmp_path, f"train.init_from={tmp_path / 'groupvit.pth'}"))
    with pytest.raises(ConfigError, match="data.img_size"):
        plan_training(tiny_config(shapes_data, tmp_path, "data.img_size=32"))
    with pytest.raises(ConfigError, match="train.workers"):
        check_resources(tiny_config(shapes_data, tmp_path, "train.workers=3", "train.cpus_per_worker=1"), 2.0)
    plan = plan_training(tiny_config(shapes_data, tmp_path, "train.workers=2", "schedule.epochs=3"))
    assert (plan.samples_per_epoch, plan.steps_per_epoch, plan.total_steps) == (512, 16, 48)


@pytest.mark.parametrize("args, key", [(["--set", "train.nope=1"], "train.nope"),
                                       (["--set", "train.workers=two"], "train.workers"),
                                       (["--set", "train.workers=3", "--set", "train.cpus_per_worker=1"],
                                        "train.workers"),
                                       (["--set", "tracking.uri=http://127.0.0.1:9"], "tracking.uri")])
def test_job_config_errors_fail_before_ray_starts(shapes_data, tmp_path, args, key):
    import subprocess

    code = ("import sys, ray; from jobs.train import main; rc = main(sys.argv[1:]); "
            "print('RAY_STARTED' if ray.is_initialized() else 'NO_RAY'); sys.exit(rc)")
    env = {"PATH": "/usr/bin:/bin", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code, "--config", "tiny", "--set",
                          f"data.shards=[{shapes_data['shards']}]", *args], capture_output=True, text=True,
                         timeout=120, env=env, cwd=str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert key in out.stderr and "error:" in out.stderr
    assert "NO_RAY" in out.stdout


# ------------------------------------------------------------------------------------------------ on Ray
def test_two_workers_learn_with_identical_replicas_and_the_global_batch(ray_local, shapes_data, tmp_path,
                                                                      mlflow_server, monkeypatch):
    monkeypatch.setenv("PGSEG_FAULT_INJECT", "nan@6:1")  # rank 1's loss poisoned: every rank skips that step
    config = tiny_config(shapes_data, tmp_path, "train.workers=2", "schedule.epochs=2", "train.name=ddp",
                     "train.checkpoint_every=16", tracking=mlflow_server)
    plan = plan_training(config)
    result = fit(plan)
    assert result.finished and result.step == plan.total_steps == 32
    # replicas: every rank's parameters and prototype buffers hash the same at the final checkpoint
    from pathlib import Path

    ranks = [torch.load(Path(result.checkpoint) / f"rank{r}.pt", weights_only=True)["digests"] for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert all(torch.isfinite(v).all() for v in checkpoint_state(result.checkpoint)["model"].values())
    # metrics read back from the MLflow server over HTTP: one value per step, the loss falls
    loss = history(mlflow_server, result.run_id, "loss")
    assert [s for s, _ in loss] == [s for s in range(1, 33) if s != 7]  # step 7 (index 6) was non-finite: not logged
    first, last = [v for _, v in loss[:5]], [v for _, v in loss[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.05, (first, last)
    assert {v for _, v in history(mlflow_server, result.run_id, "global_batch")} == {32.0}  # 2 ranks × 16
    assert history(mlflow_server, result.run_id, "nonfinite_steps")[-1][1] == 1.0
    for key in ("loss/itc", "loss/pg_stage0", "loss/pg_text", "lr", "itc_scale", "pg_scale", "tnpr_grad_norm",
                "hrs_kept_stage1", "images_per_s", "skips/bad_image", "time/data"):
        assert history(mlflow_server, result.run_id, key), key
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server).get_run(result.run_id)
    assert run.data.params["train.workers"] == "2" and run.info.status == "FINISHED"
    # the rates the run resolved (the tiny preset keeps its rate at any batch)
    assert {k: run.data.params[f"run.{k}"] for k in ("global_batch", "lr_factor", "lr")} == {
        "global_batch": "32", "lr_factor": "1.0", "lr": str(config.optim.lr)}
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(result.run_id)}
    assert {"config.yaml", "model.safetensors"} <= artifacts


def test_nonfinite_stop_names_the_step(ray_local, shapes_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PGSEG_FAULT_INJECT", "nan@1")
    config = tiny_config(shapes_data, tmp_path, "train.nonfinite=stop", "train.name=nan", "tracking.enabled=false",
                     "data.batch_size=32")
    with pytest.raises(TrainingError, match="non-finite loss at step 1"):
        fit(plan_training(config))
    # on the embedded Ray nothing is ever drained: Ray Train starts no preemption watcher for the run
    from ray.util.state import list_actors

    watchers = list_actors(ray_local.get_runtime_context().gcs_address,  # this session's cluster, not the latest
                           filters=[("class_name", "=", "PreemptionWatcher")])
    assert watchers == []


def test_a_dev_evaluation_longer_than_the_collective_timeout_stalls_no_rank(ray_local, shapes_data, tmp_path):
    """2 workers, a collective timeout of 15 s, a dev set that takes longer than that to score (images scored at 640
    px, 361 windows each, as many as take a rank ~25 s on this machine: 24 on a slow one, more on a fast one):
    each rank scores its half and the counts are summed, so no rank waits in a collective while another scores. The
    run finishes, and its dev mIoU is the whole set's: the in-process figure of the model it kept. A set in
    eval.final_datasets is scored once, by the final model: its figure is the exported model's in-process one."""
    import time

    from pgseg.checkpoint import load_model
    from pgseg.datasets import open_dataset
    from pgseg.evaluate import evaluate_in_process
    from pgseg.model import PGSeg
    from pgseg.segment import ProtocolSettings, background_threshold
    from pipelines.data.shapes_world import write_voc_val
    from pipelines.train.fit import BEST_MODEL_FILE, MODEL_FILE

    sets = ["train.workers=2", "train.collective_timeout_s=15", "eval.short_side=640", "train.checkpoint_every=100",
            "data.batch_size=32", "train.name=slow-eval", "tracking.enabled=false"]
    probe = open_dataset(f"voc:{write_voc_val(shapes_data['world'], tmp_path / 'probe', 2)}")
    base = tiny_config(shapes_data, tmp_path, *sets)
    torch.set_num_threads(1)  # a rank's time per image on this machine (the same computation whatever the weights)
    started = time.perf_counter()
    evaluate_in_process(PGSeg.from_config(base).eval(), probe, ProtocolSettings.of(base.eval, 0.95))
    per_image = (time.perf_counter() - started) / 2
    # each rank scores half the set: ~25 s a rank, against a timeout of 15 s
    dev = write_voc_val(shapes_data["world"], tmp_path / "dev", max(24, math.ceil(2 * 25 / per_image)))
    last = write_voc_val(shapes_data["world"], tmp_path / "last", 6, "val")
    config = tiny_config(shapes_data, tmp_path, *sets, f"eval.datasets=[voc:{dev}]", f"eval.final_datasets=[voc:{last}]")
    plan = plan_training(config)
    scratch = set(Path(tempfile.gettempdir()).glob("pgseg-best-*"))
    result = fit(plan)
    assert result.finished
    assert result.metrics["time/eval"] > config.train.collective_timeout_s  # one rank alone would have timed out
    assert set(Path(tempfile.gettempdir()).glob("pgseg-best-*")) <= scratch  # rank 0's scratch copy is gone
    dataset = open_dataset(f"voc:{dev}")
    settings = ProtocolSettings.of(config.eval, background_threshold(None, config.eval, dataset.bg_thresh))
    scores, _ = evaluate_in_process(load_model(plan.local_run_dir / BEST_MODEL_FILE)[0], dataset, settings)
    # every rank scored rank 0's model (its BatchNorm statistics too: after the last step each rank holds its own
    # batch's), the one kept; the same pixels up to a near-tie falling the other way on another thread count
    assert result.metrics[f"eval/{dataset.name}/mIoU"] == pytest.approx(scores.miou, abs=1e-4)
    final = open_dataset(f"voc:{last}")
    final_scores, _ = evaluate_in_process(load_model(plan.local_run_dir / MODEL_FILE)[0], final, settings)
    assert result.metrics["eval/last/mIoU"] == pytest.approx(final_scores.miou, abs=1e-4)


def test_storage_on_a_cluster_of_several_nodes_must_be_shared():
    from pipelines.train.storage import check_storage

    with pytest.raises(ConfigError, match=r"train.storage_path: /data/runs is a folder on this machine, but the "
                                          r"cluster has 3 nodes.*train.shared_storage=true"):
        check_storage("/data/runs", shared=False, nodes=3)
    check_storage("/data/runs", shared=False, nodes=1)  # one node: its disk is the storage
    check_storage("/nfs/runs", shared=True, nodes=3)  # declared shared
    check_storage("s3://bucket/runs", shared=False, nodes=3)


def test_a_run_stored_by_uri_keeps_its_checkpoints_and_best_model_there(tiny_run):
    """train.storage_path as a URI (the session's tiny run, stored by a file:// URI): Ray Train's checkpoints and the
    best model by the dev set (written by rank 0, wherever it runs) land in that storage."""
    from pipelines.train.fit import BEST_MODEL_FILE

    result, storage = tiny_run
    assert result.finished and result.checkpoint.startswith(str(storage))
    assert (storage / "tiny" / BEST_MODEL_FILE).is_file()
    assert "eval/val/mIoU" in result.metrics
    assert not list((storage / "tiny").glob("*.partial"))


def test_tracking_uri_follows_config_then_environment_then_local_sqlite(monkeypatch, tmp_path):
    from pipelines.tracking import resolve_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri(None) == "http://127.0.0.1:5000"
    assert resolve_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"


def _batch(config, b=8):
    from pgseg.text import tokenize

    size = config.model.image.img_size
    return {"image": torch.randn(b, 3, size, size),
            "tokens": tokenize(["a red circle", "two stars", "a square", "a blue star"] * (b // 4),
                               config.model.text.context_length)}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_update_the_model(precision):
    config = load_config("tiny", [f"train.precision={precision}"])
    stepper = TrainStep(config, steps_per_epoch=10, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in stepper.model.state_dict().items()}
    batch = _batch(config)
    for step in range(30):  # fp16: the GradScaler starts at 2^16 and halves until the gradients fit
        result = stepper(batch, step)
        assert result.finite and math.isfinite(result.losses["loss"])
        if math.isfinite(result.grad_norm):
            break
    assert math.isfinite(result.grad_norm)
    changed = [k for k, v in stepper.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("img_encoder" in k for k in changed) and any("text_encoder" in k for k in changed)
    assert stepper.scaler.is_enabled() == (precision == "fp16")


def test_auto_precision_is_fp32_on_cpu_and_bf16_or_fp16_on_a_gpu():
    from pgseg.train.step import step_precision

    assert TrainStep(load_config("tiny"), steps_per_epoch=10).precision == "fp32"  # the default: auto
    assert step_precision("auto", torch.device("cpu")) == "fp32" and step_precision("fp16", torch.device("cpu")) == "fp16"
    if torch.cuda.is_available():
        assert step_precision("auto", torch.device("cuda")) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.slow
def test_compiled_encoders_train_as_the_eager_ones(monkeypatch):
    """train.compile: the encoders compiled by inductor (on CPU too); with inductor drawing its random numbers as
    eager does (Gumbel noise), three steps give the eager losses and weights up to float noise (which the hard
    assignment can turn into a token in another group: a few 1e-4 of the loss), and the state dict keeps the
    released parameter names."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    losses, states, moves = {}, {}, {}
    for compiled in (False, True):
        config = load_config("tiny", [f"train.compile={str(compiled).lower()}"])
        stepper = TrainStep(config, steps_per_epoch=10)
        start = torch.cat([p.detach().flatten().clone() for p in stepper.params])
        torch.manual_seed(1)
        batch = _batch(config)
        torch.manual_seed(2)
        torch._dynamo.utils.counters.clear()
        losses[compiled] = [stepper(batch, step).losses["loss"] for step in range(3)]
        assert (torch._dynamo.utils.counters["frames"]["ok"] > 0) == compiled  # dynamo captured the encoders
        states[compiled] = stepper.model.state_dict()
        moves[compiled] = torch.cat([p.detach().flatten() for p in stepper.params]) - start
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)
    assert list(states[True]) == list(states[False])
    # the weights went the same way (AdamW's early steps are ±lr per weight, so single weights may differ by one)
    assert torch.nn.functional.cosine_similarity(moves[True], moves[False], dim=0) > 0.99


def test_the_prototype_ema_moves_only_with_an_applied_step():
    """fp16: the GradScaler skips the first steps (scale 2^16 overflows the gradients) and lowers its scale; the
    image and text prototypes stay where they were on those steps and move on the first step it applies."""
    config = load_config("tiny", ["train.precision=fp16"])
    stepper = TrainStep(config, steps_per_epoch=10, device=torch.device("cpu"))

    def prototypes():
        return {k: v.clone() for k, v in stepper.model.state_dict().items() if k.endswith(".mu")}

    batch, skipped = _batch(config), 0
    assert any("text_encoder" in k for k in prototypes()) and any("img_encoder" in k for k in prototypes())
    for step in range(30):
        before, scale = prototypes(), stepper.scaler.get_scale()
        result = stepper(batch, step)
        moved = [k for k, v in prototypes().items() if not torch.equal(v, before[k])]
        if stepper.scaler.get_scale() < scale:  # skipped by the scaler
            assert not math.isfinite(result.grad_norm) and moved == [], moved
            skipped += 1
        else:
            assert set(moved) == set(before)
            break
    assert skipped >= 1 and math.isfinite(result.grad_norm)


@pytest.mark.parametrize("layout", ["gcc_yfcc_30e", "gcc_redcap_30e"])
def test_official_recipe_starts_from_either_groupvit_release_layout(tmp_path, layout):
    """The training step of `pgseg train --config official` (its optimiser, schedule and NPR settings, at the tiny
    architecture) initialised from a file in each layout of GroupViT's released checkpoints."""
    from pgseg.config.load import load_raw
    from released_files import groupvit_release_file

    tiny = load_raw("tiny")
    state = groupvit_release_file(tmp_path / f"{layout}.pth", layout)
    config = load_config({"base": "official", "model": tiny["model"], "eval": tiny["eval"]}, [
        f"data.img_size={tiny['data']['img_size']}", "train.workers=1", "train.use_gpu=false", "train.precision=fp32",
        f"train.init_from={tmp_path / f'{layout}.pth'}"])
    assert config.npr.mode == "official" and config.loss.multi_label == 0
    stepper = TrainStep(config, steps_per_epoch=10, device=torch.device("cpu"))
    ours = stepper.model.state_dict()
    shared = [k for k in state if k in ours]
    assert len(shared) == len(state) - (layout == "gcc_yfcc_30e")  # all but the multi-label temperature
    assert all(torch.equal(ours[k], state[k].reshape(ours[k].shape)) for k in shared)
    assert "multi_label_logit_scale" not in ours  # the recipe has no multi-label loss: dropped, not kept
    assert any("downsample_spatial" in k for k in ours if k not in shared)  # the PG units keep their init
    assert stepper(_batch(config), 0).finite