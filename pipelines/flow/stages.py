"""The stages of a workflow, each a function of the run's context returning its manifest record: sources (the shapes
world or url lists), download (img2dataset into shards), train (Ray Train), evaluate (Ray Data) and analyze (what
the groups do apart from their names, in this process)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pgseg.checkpoint import model_step
from pgseg.config import Config, ConfigError, to_dict
from pgseg.datasets import open_dataset
from pgseg.fileio import atomic_write_bytes, atomic_write_json
from pgseg.segment import ProtocolSettings, background_threshold
from pipelines import storage
from pipelines.data.download import download
from pipelines.data.shapes_world import ShapesWorld, download_world, write_train_images, write_voc_val
from pipelines.data.sources import build_url_list
from pipelines.digest import file_digest, tree_digest, value_digest
from pipelines.evaluate import evaluate_many
from pipelines.flow.curve import learning_curve
from pipelines.flow.experiment import Experiment, training_config
from pipelines.flow.manifest import StageRecord
from pipelines.runtime import start_ray
from pipelines.tracking import Tracker, log_eval, log_manifest
from pipelines.train import BEST_MODEL_FILE, TrainingError, fit, plan_training

STAGE_INPUTS = ".{name}.inputs.json"  # beside the shards and training run folders: the inputs they were made with


@dataclass
class Context:
    experiment: Experiment
    root: Path
    tracker: Tracker | None  # None without tracking
    workflow_run: str | None
    records: dict[str, StageRecord] = field(default_factory=dict)
    ray_started: bool = False
    printer: Callable[[str], None] = print
    train_config: Config | None = None  # the resolved training config, made once per run
    input_hash: str = ""  # the inputs of the stage running now (its section and the stages before it)

    def ray(self) -> None:
        if not self.ray_started:
            start_ray(self.experiment.address)
            self.ray_started = True

    def link_child(self, run_id: str) -> None:
        """The stage's MLflow run becomes a child of the workflow's."""
        if self.workflow_run and run_id != self.workflow_run:
            self.tracker.set_tags(run_id, {"mlflow.parentRunId": self.workflow_run})


def stage_sources(ctx: Context) -> StageRecord:
    section = ctx.experiment.sources
    if section.shapes is not None:
        shapes = section.shapes
        world = ShapesWorld(**shapes.world)
        out = ctx.root / "shapes"
        rows = write_train_images(world, out / "www", shapes.train_images)
        atomic_write_json(out / "rows.json", rows)
        atomic_write_bytes(out / "nouns.txt", ("\n".join(world.nouns) + "\n").encode())
        write_voc_val(world, out / "val", shapes.val_images, "val")
        outputs = {"www": str(out / "www"), "rows": str(out / "rows.json"), "val": str(out / "val"),
                   "nouns": str(out / "nouns.txt")}
        if shapes.dev_images:
            write_voc_val(world, out / "dev", shapes.dev_images, "dev")
            outputs["dev"] = str(out / "dev")
        ctx.printer(f"sources: shapes world of {len(world.classes)} classes ({', '.join(world.classes)}): "
                    f"{shapes.train_images} training pairs, {shapes.val_images} val, {shapes.dev_images} dev images")
        return StageRecord("sources", "", value_digest([tree_digest(out / "www"), file_digest(out / "rows.json"),
                                                 tree_digest(out / "val")]), outputs, 0.0)
    ctx.ray()
    report = build_url_list(section.specs, ctx.root / "urls", seed=section.seed, rows_per_part=section.rows_per_part)
    ctx.printer(report.text())
    return StageRecord("sources", "", file_digest(ctx.root / "urls" / "sources_report.json"),
                       {"url_list": str(ctx.root / "urls")}, 0.0, metrics={"url_rows": float(report.total["written"])})


def stage_download(ctx: Context) -> StageRecord:
    spec = ctx.experiment.download
    shards = ctx.experiment.stored("shards")
    start_over_if_inputs_changed(ctx, shards, "download")
    previous = ctx.records.get("sources")
    if spec.distributor == "ray":
        ctx.ray()
    if previous is not None and "rows" in previous.outputs:  # the shapes world: served on 127.0.0.1
        rows = json.loads(Path(previous.outputs["rows"]).read_text())
        manifest = download_world(previous.outputs["www"], rows, ctx.root / "urls", shards, spec,
                                  ctx.experiment.sources.shapes.serve)
    else:
        url_list = previous.outputs["url_list"] if previous is not None else ctx.experiment.url_list
        manifest = download(url_list, shards, spec)
    run_id = None
    if ctx.tracker:
        run_id = log_manifest(manifest, uri=ctx.tracker.uri, experiment=ctx.experiment.tracking.experiment,
                              run_name=f"{ctx.experiment.name}-download", params={"output": str(shards)})
        ctx.link_child(run_id)
    ctx.printer(f"download: {manifest['samples']} of {manifest['attempted']} samples in {manifest['num_shards']} "
                f"shard(s) at {shards}")
    digest = value_digest([(s["tar"], s["samples"]) for s in manifest["shards"]] + [tree_digest(shards)])
    return StageRecord("download", "", digest, {"shards": str(shards)}, 0.0, run_id,
                       {"samples": float(manifest["samples"]), "success_rate": float(manifest["success_rate"])})


def stage_train(ctx: Context) -> StageRecord:
    config = ctx.train_config
    plan = plan_training(config)
    fresh = start_over_if_inputs_changed(ctx, plan.local_run_dir, "train")
    ctx.ray()
    # a run stored elsewhere (s3://…): its final model (and the best one, if kept) are fetched into the workdir
    models = ctx.root / "model" if plan.local_run_dir is None else None
    result = fit(plan, fresh=fresh, model_dir=models)  # checks the cluster's resources first
    if result.run_id:
        ctx.link_child(result.run_id)
    if not result.finished or not result.model_file:
        raise TrainingError(f"training stopped at step {result.step} of {result.total_steps}; run the workflow "
                            f"again to continue it")
    outputs = {"model": result.model_file}
    best = Path(result.model_file).with_name(BEST_MODEL_FILE)
    stored_best = storage.child(plan.run_key, BEST_MODEL_FILE)
    if models is not None and storage.is_file(stored_best):
        atomic_write_bytes(best, storage.read_bytes(stored_best))
    elif models is not None:
        best.unlink(missing_ok=True)  # an earlier run's
    if best.is_file():
        outputs["best_model"] = str(best)
    ctx.printer(f"train: {result.step} steps, model at {result.model_file}"
                + (f", best (by {config.eval.datasets[0]}) at {best}" if best.is_file() else ""))
    if result.champion and ctx.tracker:
        ctx.printer(f"train: the best kept checkpoint is {result.champion}; serve it on 127.0.0.1:5001 with\n"
                    f"  MLFLOW_TRACKING_URI={ctx.tracker.uri} mlflow models serve -m {result.champion} "
                    f"--env-manager local -h 127.0.0.1 -p 5001")
    if ctx.tracker and result.run_id:
        dev = open_dataset(config.eval.datasets[0]).name if config.eval.datasets else None
        curve = learning_curve(ctx.tracker, result.run_id, dev, ctx.root / "learning_curve.png")
        if curve is not None:  # (a picture, not an output: a missing one does not make the stage run again)
            ctx.printer(f"train: learning curve at {curve}")
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and k.startswith("eval/")}
    return StageRecord("train", "", value_digest([file_digest(p) for p in outputs.values()]), outputs, 0.0,
                       result.run_id, metrics)


def start_over_if_inputs_changed(ctx: Context, folder: str | Path | None, stage: str) -> bool:
    """A stage's output folder is continued only with the inputs it was started with (a failed stage run again:
    img2dataset keeps its finished shards, training its checkpoints). When they changed (the stage's section, or
    the stages before it), a local folder is moved aside, kept, and the stage starts over; a prefix in an object
    store is not moved (that would copy every object): the stage stops with a ConfigError saying what to do.
    Returns whether the stage starts over."""
    if folder is None:  # a training run in storage elsewhere (s3://): its runs are named by the user
        return False
    folder = str(folder)
    parent, _, name = folder.rstrip("/").rpartition("/")
    mark = storage.child(parent, STAGE_INPUTS.format(name=name))  # beside it: img2dataset owns the shards folder
    try:
        before = json.loads(storage.read_bytes(mark))["input_hash"]
    except (OSError, ValueError, KeyError):
        before = None
    fresh = False
    if before != ctx.input_hash and storage.holds_anything(folder):
        if storage.is_uri(folder):
            raise ConfigError(f"{stage}: its inputs changed since {folder} was made, and a prefix in an object store "
                              f"is not moved aside: remove it, or give the experiment another storage")
        local = Path(folder)
        stem = f"{local.name}@{(before or 'earlier')[:12]}"
        names = (stem if n == 0 else f"{stem}.{n}" for n in range(1000))
        aside = next(local.with_name(n) for n in names if not local.with_name(n).exists())
        local.rename(aside)
        ctx.printer(f"{stage}: its inputs changed since {folder} was made: that is now {aside}; {stage} starts over")
        fresh = True
    if not storage.is_uri(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
    storage.write_json(mark, {"input_hash": ctx.input_hash})
    return fresh


def trained_model(ctx: Context, choice: str) -> str:
    """The train stage's model file: ``best`` (by the dev set, when one was scored) or ``final``."""
    train = ctx.records["train"]
    return (train.outputs.get("best_model") if choice == "best" else None) or train.outputs["model"]


def stage_datasets(ctx: Context, specs: list[str]) -> list:
    """The sets a stage scores, all opened (checked) before the first one runs: ``KIND:ROOT`` with ``{workdir}``
    replaced, or ``shapes`` for the shapes world's val set."""
    datasets = []
    for spec in specs:
        spec = spec.replace("{workdir}", str(ctx.root))
        if spec == "shapes":
            spec = f"voc:{ctx.records['sources'].outputs['val']}"
        datasets.append(open_dataset(spec))
    return datasets


def stage_evaluate(ctx: Context) -> StageRecord:
    section = ctx.experiment.evaluate
    train = ctx.records["train"]
    model = trained_model(ctx, section.model)
    step = model_step(model)  # the training step the model was taken at (read once, for every set)
    e = ctx.train_config.eval
    out = ctx.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    datasets = stage_datasets(ctx, section.datasets)
    ctx.ray()
    results, metrics = {}, {}
    plans = [(d, ProtocolSettings.of(e, background_threshold(section.bg_thresh, e, d.bg_thresh))) for d in datasets]
    for result in evaluate_many(model, plans, actors=section.actors, use_gpu=section.use_gpu,
                                true_labels=section.true_labels, overlays=section.overlays):
        ctx.printer(result.table_text())
        if result.hint():
            ctx.printer(f"hint: {result.hint()}")
        result.write(out)  # table, figures and overlays (image | ground truth | prediction)
        if ctx.tracker and train.run_id:  # at the model's step: the training run's final figures are the last's
            log_eval(result, ctx.tracker.uri, run_id=train.run_id, step=step)
        results[result.dataset] = {**result.figures(), "model": model}
        metrics[f"eval/{result.dataset}/mIoU"] = result.scores.miou
        metrics[f"eval/{result.dataset}/all_background_mIoU"] = result.baseline_miou
    atomic_write_json(out / "results.json", results)
    return StageRecord("evaluate", "", file_digest(out / "results.json"), {"results": str(out / "results.json")}, 0.0,
                       train.run_id, metrics)


def stage_analyze(ctx: Context) -> StageRecord:
    from pgseg.analyze import analyze
    from pgseg.checkpoint import load_model
    from pipelines.tracking import log_analysis

    section = ctx.experiment.analyze
    train = ctx.records["train"]
    path = trained_model(ctx, section.model)
    datasets = stage_datasets(ctx, section.datasets)
    model, config = load_model(path)
    out = ctx.root / "analyze"
    results, figures, metrics = [], {}, {}
    for dataset in datasets:
        settings = ProtocolSettings.of(config.eval, background_threshold(section.bg_thresh, config.eval,
                                                                         dataset.bg_thresh))
        result = analyze(model, dataset, settings, section.image_size or config.data.img_size, section.max_images)
        ctx.printer(result.text())
        ctx.printer(f"analyze: figures and pictures in {result.write(out)}")
        results.append(result)
        figures[dataset.name] = {**result.figures(), "model": path}
        metrics.update(result.metrics())
    if ctx.tracker and train.run_id:
        log_analysis(results, ctx.tracker.uri, run_id=train.run_id)
    atomic_write_json(out / "results.json", figures)
    return StageRecord("analyze", "", file_digest(out / "results.json"), {"results": str(out / "results.json")}, 0.0,
                       train.run_id, metrics)


RUNNERS: dict[str, Callable[[Context], StageRecord]] = {
    "sources": stage_sources, "download": stage_download, "train": stage_train, "evaluate": stage_evaluate,
    "analyze": stage_analyze}


def stage_section(experiment: Experiment, stage: str, train_config: Config | None = None) -> Any:
    """What a stage's input hash covers of the experiment (besides the digests of the stages before it)."""
    if stage == "train":
        return to_dict(train_config or training_config(experiment))
    value = getattr(experiment, stage)
    section = to_dict(value) if hasattr(value, "__dataclass_fields__") else value
    if stage == "download":  # (where the shards go is an input once it is not the workdir: a new place, a new download)
        placed = {"output": experiment.stored("shards")} if experiment.storage is not None else {}
        return {"spec": section, "url_list": experiment.url_list, **placed}
    return section
