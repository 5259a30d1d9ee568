"""An experiment file, typed and checked: the stages it names (sources → download → train → evaluate → analyze), each a
section of its own, and the training section with the workflow's wiring (shards, storage, tracking, the dev set)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pgseg.config import Config, ConfigError, load_config
from pgseg.config.load import deep_merge, from_dict, parse_override, read_mapping
from pipelines.data.download import DownloadSpec
from pipelines.data.shapes_world import ShapesWorld
from pipelines.data.sources import SourceSpec
from pipelines.storage import child, is_uri

STAGES = ("sources", "download", "train", "evaluate", "analyze")
DATA_STAGES = ("sources", "download")  # the stages a sweep runs before its trials (they need no model)


@dataclass
class ShapesSource:
    """The generated shapes world (pipelines.data.shapes_world): training pairs to download, a VOC-format ``val`` set to
    report on and a ``dev`` set to pick the checkpoint by."""

    world: dict[str, Any] = field(default_factory=dict)  # ShapesWorld parameters
    train_images: int = 20000
    val_images: int = 200
    dev_images: int = 100
    serve: Literal["http", "file"] = "http"


@dataclass
class SourcesStage:
    shapes: ShapesSource | None = None
    specs: list[SourceSpec] = field(default_factory=list)  # url-list sources (pipelines.data.sources)
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
class AnalyzeStage:
    """``pgseg analyze`` on the trained model (in the workflow's process, no Ray): oracle-group mIoU beside the
    protocol's, the group embeddings' compactness and richness, parameters and FLOPs."""

    datasets: list[str] = field(default_factory=lambda: ["shapes"])  # as evaluate.datasets
    model: Literal["final", "best"] = "best"
    max_images: int | None = None  # the first N images of each set (None: all)
    image_size: int | None = None  # of the FLOP count (None: the training size)
    bg_thresh: float | None = None


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
    # where the shards and the training runs go: a folder or a URI every node reaches (s3://bucket/prefix; the
    # credentials from the environment); default: the workdir. The workdir keeps the rest (stage records, url
    # lists, the final model, evaluations)
    storage: str | None = None
    tracking: WorkflowTracking = field(default_factory=WorkflowTracking)
    sources: SourcesStage | None = None
    url_list: str | None = None  # a url list to download when the experiment has no sources stage
    download: DownloadSpec | None = None
    train: dict[str, Any] | None = None  # a training config (base: preset or path, then its keys)
    evaluate: EvaluateStage | None = None
    analyze: AnalyzeStage | None = None
    source_dir: str = "."  # the experiment file's folder (relative paths in it start there)

    @property
    def stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s) is not None]

    @property
    def root(self) -> Path:
        return Path(self.workdir or f"outputs/{self.name}").resolve()

    def stored(self, name: str) -> str:
        """Where the workflow keeps ``name`` (shards, runs): under ``storage`` if given, else the workdir."""
        if self.storage is None:
            return str(self.root / name)
        return child(self.storage if is_uri(self.storage) else str(Path(self.storage).resolve()), name)


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
    for stage in ("evaluate", "analyze"):
        section = getattr(experiment, stage)
        world = experiment.sources is not None and experiment.sources.shapes is not None
        if section is not None and "shapes" in section.datasets and not world:
            raise ConfigError(f"{stage}.datasets: 'shapes' is the generated world's val set, but the experiment has "
                              f"no sources.shapes stage")
    if experiment.analyze is not None:
        a = experiment.analyze
        if not a.datasets:
            raise ConfigError("analyze.datasets: give at least one KIND:ROOT (or shapes)")
        if experiment.train is None:
            raise ConfigError("analyze: needs a train stage (or use `pgseg analyze` on a model file)")
        if a.max_images is not None and a.max_images < 1:
            raise ConfigError(f"analyze.max_images: must be >= 1, got {a.max_images}")
        if a.image_size is not None and a.image_size < 1:
            raise ConfigError(f"analyze.image_size: must be >= 1, got {a.image_size}")
    return experiment


def train_section(experiment: Experiment) -> dict[str, Any]:
    """The training section with the workflow's wiring filled in where the section leaves it open: shards from the
    download stage, storage and name from the workdir and experiment, tracking from the experiment, the shapes
    world's dev set as the set that picks the best model and its val set scored on the final model."""
    raw = dict(experiment.train or {})
    base = raw.get("base")
    if isinstance(base, str) and (Path(experiment.source_dir) / base).is_file():
        raw["base"] = str(Path(experiment.source_dir) / base)
    wiring: dict[str, Any] = {"train": {"storage_path": experiment.stored("runs"), "name": experiment.name},
                              "tracking": {"uri": experiment.tracking.uri, "experiment": experiment.tracking.experiment,
                                           "enabled": experiment.tracking.enabled}}
    if experiment.download is not None:
        wiring["data"] = {"shards": [experiment.stored("shards")]}
    if experiment.sources is not None and experiment.sources.shapes is not None:
        shapes = experiment.root / "shapes"
        wiring["loss"] = {"noun_vocabulary": str(shapes / "nouns.txt")}  # the world's class names
        scored = {"datasets": [f"voc:{shapes / 'dev'}"]} if experiment.sources.shapes.dev_images > 0 else {}
        if experiment.sources.shapes.val_images > 0:  # the final model's val mIoU (eval/val/mIoU), picks nothing
            scored["final_datasets"] = [f"voc:{shapes / 'val'}"]
        if scored:
            wiring["eval"] = scored
    return deep_merge(wiring, raw)


def training_config(experiment: Experiment) -> Config:
    raw = train_section(experiment)
    try:
        return load_config({k: v for k, v in raw.items()})
    except ConfigError as exc:
        raise ConfigError(f"train.{exc}") from None
