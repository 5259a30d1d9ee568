"""Workflows: ``pgseg run EXPERIMENT.yaml`` chains the stages an experiment names — sources → download → train →
evaluate — in that order, in one working folder.

Each finished stage writes ``<workdir>/.workflow/<stage>.json``: the hash of its inputs (its own section of the
experiment and the digests of the stages before it), the digest of what it produced, its outputs, its seconds and
its MLflow run. A stage is skipped when that manifest matches and its outputs are still there, and as long as no
stage before it ran in this invocation; otherwise it runs, and so does every stage after it. A stage's manifest is
removed before it starts, so a failed stage is redone by the next run (training continues from its latest
checkpoint: the run keeps its name). One MLflow run per workflow links the stages' runs: the training run is its
child, the evaluation logs into the training run and its mIoU is copied onto the workflow run.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from pgseg.config import ConfigError
from pgseg.config.load import deep_merge, from_dict, parse_override, read_mapping, to_dict
from pgseg.fileio import atomic_write_bytes, atomic_write_json
from pipelines.digest import file_digest, tree_digest, value_digest
from pipelines.download import DownloadSpec
from pipelines.sources import SourceSpec

log = logging.getLogger(__name__)

STAGES = ("sources", "download", "train", "evaluate")
STATE_DIR = ".workflow"
WORKFLOW_KEY_TAG = "pgseg.workflow_key"


# ------------------------------------------------------------------------------------------------ the experiment
@dataclass
class ShapesSource:
    """The generated shapes world (pipelines.shapes_world): training pairs to download, a VOC-format ``val`` set to
    report on and a ``dev`` set to pick the checkpoint by."""

    world: dict[str, Any] = field(default_factory=dict)  # ShapesWorld parameters
    train_images: int = 20000
    val_images: int = 200
    dev_images: int = 100
    serve: Literal["http", "file"] = "http"


@dataclass
class SourcesStage:
    shapes: ShapesSource | None = None
    specs: list[SourceSpec] = field(default_factory=list)  # url-list sources (pipelines.sources)
    seed: int = 0
    rows_per_part: int = 1_000_000


@dataclass
class EvaluateStage:
    datasets: list[str] = field(default_factory=list)  # KIND:ROOT; {workdir} is replaced; "shapes" = the world's val
    model: Literal["final", "best"] = "best"  # best: the training's best model by its eval.select set, if any
    actors: int = 1
    use_gpu: bool = False  # one GPU per actor
    overlays: int = 8
    bg_thresh: float | None = None  # None: the model config's eval.bg_thresh, else the dataset's default
    true_labels: bool = False


@dataclass
class WorkflowTracking:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "pgseg"


@dataclass
class Experiment:
    name: str = ""
    description: str = ""
    workdir: str | None = None  # default: outputs/<name>
    address: str | None = None  # Ray cluster (default: RAY_ADDRESS, else an embedded local Ray)
    tracking: WorkflowTracking = field(default_factory=WorkflowTracking)
    sources: SourcesStage | None = None
    url_list: str | None = None  # a url list to download when the experiment has no sources stage
    download: DownloadSpec | None = None
    train: dict[str, Any] | None = None  # a training config (base: preset or path, then its keys)
    evaluate: EvaluateStage | None = None
    source_dir: str = "."  # the experiment file's folder (relative paths in it start there)

    @property
    def stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s) is not None]

    @property
    def root(self) -> Path:
        return Path(self.workdir or f"outputs/{self.name}").resolve()


def load_experiment(path: str | Path, overrides: list[str] = ()) -> Experiment:
    """Read and check an experiment file; ``overrides`` are ``section.key=value`` (e.g. ``train.optim.lr=1e-4``).
    Every problem — unknown keys, bad types, a training config that does not validate — is a ConfigError naming
    the key, before anything runs."""
    path = Path(path)
    raw = read_mapping(path, "experiment")
    for item in overrides:
        raw = deep_merge(raw, parse_override(item))
    raw["source_dir"] = str(path.parent.resolve())
    try:
        experiment = from_dict(Experiment, raw)
    except (TypeError, ValueError) as exc:  # a section's own checks (DownloadSpec, SourceSpec)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"experiment {path}: {exc}") from None
    if not experiment.name.strip() or "/" in experiment.name:
        raise ConfigError(f"name: an experiment needs a name without '/', got {experiment.name!r}")
    if not experiment.stages:
        raise ConfigError(f"experiment {path}: no stages (give sources, download, train and/or evaluate)")
    if experiment.sources is not None and not experiment.sources.shapes and not experiment.sources.specs:
        raise ConfigError("sources: give shapes or specs")
    if experiment.download is not None and experiment.sources is None and not experiment.url_list:
        raise ConfigError("download: needs a sources stage or url_list")
    if experiment.sources is not None and experiment.sources.shapes is not None:
        from pipelines.shapes_world import ShapesWorld

        try:
            ShapesWorld(**experiment.sources.shapes.world)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"sources.shapes.world: {exc}") from None
    if experiment.train is not None:
        training_config(experiment)  # validates the training section now
    if experiment.evaluate is not None:
        if not experiment.evaluate.datasets:
            raise ConfigError("evaluate.datasets: give at least one KIND:ROOT")
        if experiment.train is None:
            raise ConfigError("evaluate: needs a train stage to evaluate (or use `pgseg eval` on a model file)")
    return experiment


def train_section(experiment: Experiment) -> dict[str, Any]:
    """The training section with the workflow's wiring filled in where the section leaves it open: shards from the
    download stage, storage and name from the workdir and experiment, tracking from the experiment, the shapes
    world's dev set as the set that picks the best model."""
    raw = dict(experiment.train or {})
    base = raw.get("base")
    if isinstance(base, str) and (Path(experiment.source_dir) / base).is_file():
        raw["base"] = str(Path(experiment.source_dir) / base)
    wiring: dict[str, Any] = {"train": {"storage_path": str(experiment.root / "runs"), "name": experiment.name},
                              "tracking": {"uri": experiment.tracking.uri, "experiment": experiment.tracking.experiment,
                                           "enabled": experiment.tracking.enabled}}
    if experiment.download is not None:
        wiring["data"] = {"shards": [str(experiment.root / "shards")]}
    if experiment.sources is not None and experiment.sources.shapes is not None:
        shapes = experiment.root / "shapes"
        wiring["loss"] = {"noun_vocabulary": str(shapes / "nouns.txt")}  # the world's class names
        if experiment.sources.shapes.dev_images > 0:
            wiring["eval"] = {"datasets": [f"voc:{shapes / 'dev'}"]}
    return deep_merge(wiring, raw)


def training_config(experiment: Experiment):
    from pgseg.config import load_config

    raw = train_section(experiment)
    try:
        return load_config({k: v for k, v in raw.items()})
    except ConfigError as exc:
        raise ConfigError(f"train.{exc}") from None


# ------------------------------------------------------------------------------------------------ manifests
@dataclass
class StageRecord:
    stage: str
    input_hash: str
    digest: str  # of what the stage produced
    outputs: dict[str, str]
    seconds: float
    run_id: str | None = None  # the stage's MLflow run, if it has one
    metrics: dict[str, float] = field(default_factory=dict)


def _manifest_path(root: Path, stage: str) -> Path:
    return root / STATE_DIR / f"{stage}.json"


def read_record(root: Path, stage: str) -> StageRecord | None:
    path = _manifest_path(root, stage)
    try:
        return StageRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # missing or unreadable: the stage runs again


def _outputs_present(record: StageRecord) -> bool:
    return all(Path(p).exists() for p in record.outputs.values() if p)


# ------------------------------------------------------------------------------------------------ the stages
@dataclass
class Context:
    experiment: Experiment
    root: Path
    uri: str | None
    workflow_run: str | None
    records: dict[str, StageRecord] = field(default_factory=dict)
    ray_started: bool = False
    printer: Callable[[str], None] = print
    train_config: Any = None  # the resolved training config, made once per run

    def ray(self) -> None:
        if not self.ray_started:
            from pipelines.runtime import start_ray

            start_ray(self.experiment.address)
            self.ray_started = True


def _stage_sources(ctx: Context) -> StageRecord:
    section = ctx.experiment.sources
    if section.shapes is not None:
        from pipelines.shapes_world import ShapesWorld, write_train_images, write_voc_val

        shapes = section.shapes
        world = ShapesWorld(**shapes.world)
        out = ctx.root / "shapes"
        rows = write_train_images(world, out / "www", shapes.train_images)
        atomic_write_json(out / "rows.json", rows)
        atomic_write_bytes(out / "nouns.txt", ("\n".join(world.classes) + "\n").encode())
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
    from pipelines.sources import build_url_list

    ctx.ray()
    report = build_url_list(section.specs, ctx.root / "urls", seed=section.seed, rows_per_part=section.rows_per_part)
    ctx.printer(report.text())
    return StageRecord("sources", "", file_digest(ctx.root / "urls" / "sources_report.json"),
                       {"url_list": str(ctx.root / "urls")}, 0.0, metrics={"url_rows": float(report.total["written"])})


def _stage_download(ctx: Context) -> StageRecord:
    spec = ctx.experiment.download
    shards = ctx.root / "shards"
    previous = ctx.records.get("sources")
    if spec.distributor == "ray":
        ctx.ray()
    if previous is not None and "rows" in previous.outputs:  # the shapes world: served on 127.0.0.1
        from pipelines.shapes_world import download_world

        rows = json.loads(Path(previous.outputs["rows"]).read_text())
        manifest = download_world(previous.outputs["www"], rows, ctx.root / "urls", shards, spec,
                                  ctx.experiment.sources.shapes.serve)
    else:
        from pipelines.download import download

        url_list = previous.outputs["url_list"] if previous is not None else ctx.experiment.url_list
        manifest = download(url_list, shards, spec)
    run_id = None
    if ctx.uri:
        from pipelines.tracking import log_manifest

        run_id = log_manifest(manifest, uri=ctx.uri, experiment=ctx.experiment.tracking.experiment,
                              run_name=f"{ctx.experiment.name}-download", params={"output": str(shards)})
        _link_child(ctx, run_id)
    ctx.printer(f"download: {manifest['samples']} of {manifest['attempted']} samples in {manifest['num_shards']} "
                f"shard(s) at {shards}")
    digest = value_digest([(s["tar"], s["samples"]) for s in manifest["shards"]] + [tree_digest(shards)])
    return StageRecord("download", "", digest, {"shards": str(shards)}, 0.0, run_id,
                       {"samples": float(manifest["samples"]), "success_rate": float(manifest["success_rate"])})


def _stage_train(ctx: Context) -> StageRecord:
    from pipelines.train import TrainingError, fit, plan_training

    config = ctx.train_config
    plan = plan_training(config)
    ctx.ray()
    result = fit(plan)  # checks the cluster's resources first
    if result.run_id:
        _link_child(ctx, result.run_id)
    if not result.finished or not result.model_file:
        raise TrainingError(f"training stopped at step {result.step} of {result.total_steps}; run the workflow "
                            f"again to continue it")
    outputs = {"model": result.model_file}
    best = Path(result.model_file).with_name("model_best.safetensors")
    if best.is_file():
        outputs["best_model"] = str(best)
    ctx.printer(f"train: {result.step} steps, model at {result.model_file}"
                + (f", best (by {config.eval.datasets[0]}) at {best}" if best.is_file() else ""))
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and k.startswith("eval/")}
    return StageRecord("train", "", value_digest([file_digest(p) for p in outputs.values()]), outputs, 0.0, result.run_id,
                       metrics)


def _stage_evaluate(ctx: Context) -> StageRecord:
    from pgseg.datasets import open_dataset
    from pgseg.segment import ProtocolSettings, background_threshold
    from pipelines.evaluate import evaluate, log_to_mlflow

    section = ctx.experiment.evaluate
    train = ctx.records["train"]
    model = train.outputs.get("best_model") if section.model == "best" else None
    model = model or train.outputs["model"]
    e = ctx.train_config.eval
    out = ctx.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    datasets = []
    for spec in section.datasets:
        spec = spec.replace("{workdir}", str(ctx.root))
        if spec == "shapes":
            spec = f"voc:{ctx.records['sources'].outputs['val']}"
        datasets.append(open_dataset(spec))  # all checked before the first one runs
    ctx.ray()
    results, metrics = {}, {}
    for dataset in datasets:
        settings = ProtocolSettings.of(e, background_threshold(section.bg_thresh, e, dataset.bg_thresh))
        result = evaluate(model, dataset, settings, actors=section.actors, use_gpu=section.use_gpu,
                          true_labels=section.true_labels,
                          overlays=section.overlays)
        ctx.printer(result.table_text())
        if result.hint():
            ctx.printer(f"hint: {result.hint()}")
        result.write(out)  # table, figures and overlays (image | ground truth | prediction)
        if ctx.uri and train.run_id:
            log_to_mlflow(result, ctx.uri, run_id=train.run_id)
        results[dataset.name] = {**result.figures(), "model": model}
        metrics[f"eval/{dataset.name}/mIoU"] = result.scores.miou
        metrics[f"eval/{dataset.name}/all_background_mIoU"] = result.baseline_miou
    atomic_write_json(out / "results.json", results)
    return StageRecord("evaluate", "", file_digest(out / "results.json"), {"results": str(out / "results.json")}, 0.0,
                       train.run_id, metrics)


RUNNERS: dict[str, Callable[[Context], StageRecord]] = {
    "sources": _stage_sources, "download": _stage_download, "train": _stage_train, "evaluate": _stage_evaluate}


def stage_section(experiment: Experiment, stage: str, train_config: Any = None) -> Any:
    """What a stage's input hash covers of the experiment (besides the digests of the stages before it)."""
    if stage == "train":
        return to_dict(train_config or training_config(experiment))
    value = getattr(experiment, stage)
    section = to_dict(value) if hasattr(value, "__dataclass_fields__") else value
    if stage == "download":
        return {"spec": section, "url_list": experiment.url_list}
    return section


# ------------------------------------------------------------------------------------------------ tracking
def _client(ctx: Context):
    from mlflow.tracking import MlflowClient

    return MlflowClient(ctx.uri)


def _link_child(ctx: Context, run_id: str) -> None:
    if ctx.workflow_run and run_id != ctx.workflow_run:
        _client(ctx).set_tag(run_id, "mlflow.parentRunId", ctx.workflow_run)


def _start_workflow_run(experiment: Experiment, uri: str) -> str:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import _experiment_id, create_run

    client = MlflowClient(uri)
    exp_id = _experiment_id(client, experiment.tracking.experiment)
    key = f"workflow:{experiment.root}:{experiment.name}"
    found = client.search_runs([exp_id], filter_string=f"tags.`{WORKFLOW_KEY_TAG}` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run_id = create_run(client, exp_id, f"workflow-{experiment.name}",
                        {WORKFLOW_KEY_TAG: key, "pgseg.workflow": experiment.name})
    client.log_text(run_id, yaml.safe_dump(to_dict(experiment), sort_keys=False), "experiment.yaml")
    return run_id


# ------------------------------------------------------------------------------------------------ the driver
@dataclass
class StageOutcome:
    stage: str
    status: Literal["ran", "skipped", "failed"]
    seconds: float
    record: StageRecord | None = None
    error: str | None = None


@dataclass
class WorkflowResult:
    experiment: str
    root: Path
    outcomes: list[StageOutcome]
    run_id: str | None

    @property
    def ok(self) -> bool:
        return all(o.status != "failed" for o in self.outcomes)

    def table_text(self) -> str:
        lines = [f"workflow {self.experiment} in {self.root}", f"{'stage':<10}{'status':<9}{'seconds':>9}"]
        for o in self.outcomes:
            lines.append(f"{o.stage:<10}{o.status:<9}{o.seconds:9.1f}" + (f"  {o.error}" if o.error else ""))
        return "\n".join(lines)


def run_workflow(experiment: Experiment, *, redo: list[str] = (), printer: Callable[[str], None] = print
                 ) -> WorkflowResult:
    """Run the experiment's stages in order, skipping those whose manifest matches (see the module docs).
    ``redo``: stages to run even when their manifest matches (the stages after them follow)."""
    from pipelines.tracking import resolve_uri

    unknown = sorted(set(redo) - set(experiment.stages))
    if unknown:
        raise ConfigError(f"redo: {', '.join(unknown)} not a stage of this experiment ({', '.join(experiment.stages)})")
    root = experiment.root
    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    uri = resolve_uri(experiment.tracking.uri) if experiment.tracking.enabled else None
    ctx = Context(experiment, root, uri, _start_workflow_run(experiment, uri) if uri else None, printer=printer,
                  train_config=training_config(experiment) if experiment.train is not None else None)
    outcomes: list[StageOutcome] = []
    upstream: list[str] = []
    ran_before = False
    for stage in experiment.stages:
        input_hash = value_digest({"stage": stage, "section": stage_section(experiment, stage, ctx.train_config),
                            "upstream": upstream})
        record = read_record(root, stage)
        if (not ran_before and stage not in redo and record is not None and record.input_hash == input_hash
                and _outputs_present(record)):
            ctx.records[stage] = record
            upstream.append(record.digest)
            outcomes.append(StageOutcome(stage, "skipped", 0.0, record))
            printer(f"[{stage}] skipped: finished before with the same inputs ({_manifest_path(root, stage)})")
            continue
        ran_before = True
        _manifest_path(root, stage).unlink(missing_ok=True)
        printer(f"[{stage}] running")
        start = time.perf_counter()
        try:
            record = RUNNERS[stage](ctx)
        except Exception as exc:  # noqa: BLE001 - reported, recorded on the workflow run, and re-raised by the caller
            seconds = time.perf_counter() - start
            outcomes.append(StageOutcome(stage, "failed", seconds, error=f"{type(exc).__name__}: {exc}"))
            printer(f"[{stage}] failed after {seconds:.1f} s: {exc}")
            _finish(ctx, outcomes, "FAILED")
            result = WorkflowResult(experiment.name, root, outcomes, ctx.workflow_run)
            raise WorkflowError(stage, result) from exc
        record.input_hash, record.seconds = input_hash, time.perf_counter() - start
        atomic_write_json(_manifest_path(root, stage), asdict(record))
        ctx.records[stage] = record
        upstream.append(record.digest)
        outcomes.append(StageOutcome(stage, "ran", record.seconds, record))
        printer(f"[{stage}] done in {record.seconds:.1f} s")
    _finish(ctx, outcomes, "FINISHED")
    return WorkflowResult(experiment.name, root, outcomes, ctx.workflow_run)


def _finish(ctx: Context, outcomes: list[StageOutcome], status: str) -> None:
    if not ctx.workflow_run:
        return
    client = _client(ctx)
    for o in outcomes:
        client.set_tag(ctx.workflow_run, f"stage.{o.stage}", o.status)
        if o.record is not None and o.record.run_id:
            client.set_tag(ctx.workflow_run, f"stage.{o.stage}.run_id", o.record.run_id)
        if o.status != "skipped":
            client.log_metric(ctx.workflow_run, f"stage_seconds/{o.stage}", o.seconds)
        if o.status == "ran":  # a skipped stage's figures are on this run from the time it ran
            for key, value in o.record.metrics.items():
                client.log_metric(ctx.workflow_run, key, value)
    client.set_terminated(ctx.workflow_run, status)


class WorkflowError(RuntimeError):
    def __init__(self, stage: str, result: WorkflowResult):
        self.stage, self.result = stage, result
        super().__init__(f"stage {stage} failed: {result.outcomes[-1].error}")
