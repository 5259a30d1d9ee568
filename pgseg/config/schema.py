"""Typed configuration of an experiment: one dataclass per concern, validated once, loaded from YAML.

Every field carries its default; presets (``presets/*.yaml``) and experiment files only say what differs.
``Config.validate`` raises :class:`ConfigError` naming the dotted key and what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

# the zero-shot protocol's image resize: "uint8" = the release's (OpenCV bilinear on the 8-bit image, then
# normalise), "float" = torch bilinear on the normalised image
RESIZE_RULES = ("uint8", "float")

__all__ = [
    "ConfigError", "ImageEncoderConfig", "TextEncoderConfig", "ModelConfig", "NPRConfig", "LossConfig",
    "OptimConfig", "ScheduleConfig", "DataConfig", "EvalConfig", "TrackingConfig", "TrainConfig", "Config",
]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or impossible; the message names the key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ImageEncoderConfig:
    """GroupViT-style encoder: patch embedding, grouping stages, a last stage without grouping (SPEC §2.1)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depths: list[int] = field(default_factory=lambda: [6, 3, 3])
    num_heads: list[int] = field(default_factory=lambda: [6, 6, 6])
    # group tokens per stage; the last stage has none (it only refines the final segments)
    num_group_tokens: list[int] = field(default_factory=lambda: [64, 8, 0])
    # segments produced by each grouping stage (one entry per stage but the last)
    num_output_groups: list[int] = field(default_factory=lambda: [64, 8])
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    hard_assignment: bool = True  # straight-through one-hot assignment (False: soft)
    gumbel: bool = True  # Gumbel noise on the assignment logits in training
    gumbel_tau: float = 1.0
    assign_eps: float = 1.0
    # a segment token = its group centre + the mean of its assigned tokens (GroupViT); False: the assigned tokens only,
    # so a group's embedding carries its region and nothing of the centre's view of the whole image
    centre_residual: bool = True
    # token-axis MLP width of the grouping block and of the stage-1 group projector, as a fraction of embed_dim
    token_mlp_ratio: float = 0.5

    def validate(self, key: str) -> None:
        n = len(self.depths)
        _require(n >= 2, f"{key}.depths", f"needs at least 2 stages (one grouping stage and a last one), got {n}")
        _require(all(d >= 0 for d in self.depths), f"{key}.depths", "must be >= 0")
        _require(len(self.num_heads) == n, f"{key}.num_heads", f"needs {n} entries (one per stage), got {len(self.num_heads)}")
        _require(len(self.num_group_tokens) == n, f"{key}.num_group_tokens",
                 f"needs {n} entries (one per stage), got {len(self.num_group_tokens)}")
        _require(len(self.num_output_groups) == n - 1, f"{key}.num_output_groups",
                 f"needs {n - 1} entries (one per grouping stage), got {len(self.num_output_groups)}")
        _require(self.num_group_tokens[-1] == 0, f"{key}.num_group_tokens", "the last stage must have 0 group tokens")
        _require(all(g > 0 for g in self.num_group_tokens[:-1]), f"{key}.num_group_tokens",
                 "every grouping stage needs at least 1 group token")
        _require(all(g > 0 for g in self.num_output_groups), f"{key}.num_output_groups", "must be > 0")
        for i, h in enumerate(self.num_heads):
            _require(h > 0 and self.embed_dim % h == 0, f"{key}.num_heads[{i}]",
                     f"must be > 0 and divide embed_dim={self.embed_dim}, got {h}")
        _require(self.patch_size > 0 and self.img_size % self.patch_size == 0, f"{key}.img_size",
                 f"must be a multiple of patch_size={self.patch_size}, got {self.img_size}")
        _require(self.embed_dim > 0, f"{key}.embed_dim", "must be > 0")
        _require(self.gumbel_tau > 0, f"{key}.gumbel_tau", "must be > 0")
        _require(0.0 <= self.drop_path_rate < 1.0, f"{key}.drop_path_rate", "must be in [0, 1)")
        _require(0.0 <= self.drop_rate < 1.0 and 0.0 <= self.attn_drop_rate < 1.0, f"{key}.drop_rate",
                 "dropout rates must be in [0, 1)")
        _require(self.token_mlp_ratio > 0 and self.mlp_ratio > 0, f"{key}.mlp_ratio", "must be > 0")


@dataclass
class TextEncoderConfig:
    """CLIP-style causal text transformer over CLIP BPE tokens (SPEC §2.3)."""

    context_length: int = 77
    width: int = 256
    layers: int = 12
    heads: int = 4
    vocab_size: int = 49408

    def validate(self, key: str) -> None:
        _require(self.width > 0 and self.heads > 0 and self.width % self.heads == 0, f"{key}.heads",
                 f"must be > 0 and divide width={self.width}, got {self.heads}")
        _require(self.layers >= 0, f"{key}.layers", "must be >= 0")
        _require(self.context_length >= 2, f"{key}.context_length", "must be >= 2 (SOT and EOT)")
        _require(self.vocab_size >= 49408, f"{key}.vocab_size", "must hold the CLIP BPE vocabulary (>= 49408)")


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    output_dim: int = 256  # joint embedding width
    proj_hidden_dim: int = 4096  # inner width of every projector (image, text, NPR mapping_x)
    proj_num_layers: int = 2
    contrast_temperature: float = 0.07  # ITC logit scale starts at ln(1/T)
    logit_scale_max: float = 100.0

    def validate(self, key: str) -> None:
        self.image.validate(f"{key}.image")
        self.text.validate(f"{key}.text")
        _require(self.output_dim > 0, f"{key}.output_dim", "must be > 0")
        _require(self.proj_hidden_dim > 0, f"{key}.proj_hidden_dim", "must be > 0")
        _require(self.proj_num_layers in (1, 2), f"{key}.proj_num_layers", "must be 1 or 2")
        _require(self.contrast_temperature > 0, f"{key}.contrast_temperature", "must be > 0")
        _require(self.logit_scale_max > 0, f"{key}.logit_scale_max", "must be > 0")


@dataclass
class NPRConfig:
    """Non-learnable prototypical regularisation (SPEC §3). ``mode`` sets every behaviour where paper and code
    differ; each such behaviour also has its own switch (``None`` = follow ``mode``) so a sweep can isolate it."""

    mode: Literal["paper", "official"] = "paper"
    enabled: bool = True  # PG units exist (EM prototypes + reconstruction); False = plain GroupViT
    i_npr: bool = True  # image-level PG loss on every grouping stage
    t_npr: bool = True  # text-level PG loss on the last grouping stage
    hrs: bool = True  # hard rejecting strategy
    phi: float = 0.1
    # prototypes per grouping stage; None = as many as the stage's groups (paper Table 5 varies it)
    num_prototypes: list[int] | None = None
    text_prototypes: int = 8
    lambda_: float = 0.1  # YAML key: lambda
    beta: float = 0.01
    em_iters: int = 10
    gamma: float = 0.9  # prototype EMA momentum
    pg_temperature: Literal["fixed", "learnable"] | None = None  # paper: fixed; official: learnable
    tau: float = 0.1  # PG-loss temperature (the learnable one starts here)
    start_epoch: int = 0  # the PG losses count from this epoch ...
    start_step: int = 0  # ... and from this global step (both must be reached)
    # behaviours that differ between the paper and the released code (None = follow mode)
    matching: Literal["max_similarity", "min_similarity"] | None = None
    # among equally good assignments: scipy's choice (the release's T-NPR ±1 costs tie everywhere) or any, faster
    matching_ties: Literal["scipy", "any"] | None = None
    hrs_rule: Literal["matched_pair", "column0"] | None = None
    pg_reduction: Literal["per_image_mean", "pooled"] | None = None
    image_ema: bool | None = None
    text_ema: Literal["train_step", "every_forward", "off"] | None = None
    # T-NPR normalises 1-D values; its backward divides by sqrt(|x|^2 + eps^2) instead of |x| (SPEC §3.4)
    grad_eps: float = 1e-3

    def resolved(self) -> "NPRConfig":
        """A copy with every ``None`` switch replaced by the value ``mode`` implies."""
        official = self.mode == "official"
        defaults = {
            "pg_temperature": "learnable" if official else "fixed",
            "matching": "min_similarity" if official else "max_similarity",
            "matching_ties": "scipy" if official else "any",
            "hrs_rule": "column0" if official else "matched_pair",
            "pg_reduction": "pooled" if official else "per_image_mean",
            "image_ema": not official,
            "text_ema": "every_forward" if official else "train_step",
        }
        return replace(self, **{k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in defaults.items()})

    def validate(self, key: str, image: ImageEncoderConfig | None = None) -> None:
        _require(0.0 <= self.phi <= 1.0, f"{key}.phi", f"must be in [0, 1], got {self.phi}")
        _require(self.lambda_ >= 0, f"{key}.lambda", f"must be >= 0, got {self.lambda_}")
        _require(self.beta >= 0, f"{key}.beta", f"must be >= 0, got {self.beta}")
        _require(self.em_iters >= 1, f"{key}.em_iters", f"must be >= 1, got {self.em_iters}")
        _require(0.0 <= self.gamma <= 1.0, f"{key}.gamma", f"must be in [0, 1], got {self.gamma}")
        _require(self.tau > 0, f"{key}.tau", f"must be > 0, got {self.tau}")
        _require(self.text_prototypes >= 1, f"{key}.text_prototypes", "must be >= 1")
        _require(self.start_epoch >= 0 and self.start_step >= 0, f"{key}.start_epoch", "must be >= 0")
        _require(self.grad_eps > 0, f"{key}.grad_eps", "must be > 0")
        if image is not None and self.num_prototypes is not None:
            n = len(image.num_output_groups)
            _require(len(self.num_prototypes) == n, f"{key}.num_prototypes",
                     f"needs {n} entries (one per grouping stage), got {len(self.num_prototypes)}")
            _require(all(p >= 1 for p in self.num_prototypes), f"{key}.num_prototypes", "must be >= 1")
        if not self.enabled:
            _require(not (self.i_npr or self.t_npr), f"{key}.enabled",
                     "is false (no PG units), so i_npr and t_npr must be false too")

    def prototypes_per_stage(self, image: ImageEncoderConfig) -> list[int]:
        return list(self.num_prototypes) if self.num_prototypes is not None else list(image.num_output_groups)


@dataclass
class LossConfig:
    itc_weight: float = 1.0
    # GroupViT's multi-label contrastive loss (off in PGSeg): K nouns per caption into prompt templates
    multi_label: int = 0
    multi_label_weight: float = 1.0
    # the same noun prompts against the image's groups (each noun scored by its best-matching group): 0 = off
    group_nouns_weight: float = 0.0
    # how an image's groups score a noun of its own caption: max = its best-matching group (several nouns may share
    # one group); exclusive = one group per noun by exact assignment (no group carries two of the caption's nouns)
    group_nouns_match: Literal["max", "exclusive"] = "max"
    share_temperature: bool = False
    noun_vocabulary: str | None = None  # a text file, one noun per line; None = the built-in vocabulary

    def validate(self, key: str) -> None:
        _require(self.itc_weight >= 0, f"{key}.itc_weight", "must be >= 0")
        _require(self.multi_label >= 0, f"{key}.multi_label", "must be >= 0 (number of nouns per caption)")
        _require(self.multi_label_weight >= 0, f"{key}.multi_label_weight", "must be >= 0")
        _require(self.group_nouns_weight >= 0, f"{key}.group_nouns_weight", "must be >= 0")
        _require(self.group_nouns_weight == 0 or self.multi_label > 0, f"{key}.group_nouns_weight",
                 "needs noun prompts: set loss.multi_label (nouns per caption) > 0")


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1.6e-3  # as are schedule.warmup_lr and min_lr: for a global batch of batch_ref images
    batch_ref: int = 4096  # the global batch the rates are given for (GroupViT's and the presets': 1024 × 4)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"  # rates × (global batch / batch_ref), its root, or 1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.05
    grad_clip: float | None = 5.0

    def validate(self, key: str) -> None:
        _require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _require(self.batch_ref >= 1, f"{key}.batch_ref", f"must be >= 1 (a global batch), got {self.batch_ref}")
        _require(self.lr_scaling in ("linear", "sqrt", "none"), f"{key}.lr_scaling",
                 f"must be linear, sqrt or none, got {self.lr_scaling!r}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
                 "must be two numbers in [0, 1)")
        _require(self.eps > 0, f"{key}.eps", "must be > 0")
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _require(self.grad_clip is None or self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 or null")


@dataclass
class ScheduleConfig:
    epochs: int = 40
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5

    def validate(self, key: str) -> None:
        _require(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        _require(0 <= self.warmup_epochs <= self.epochs, f"{key}.warmup_epochs", f"must be in [0, epochs={self.epochs}]")
        _require(self.warmup_lr >= 0 and self.min_lr >= 0, f"{key}.min_lr", "learning rates must be >= 0")


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # webdataset tars, globs or manifest files
    weights: list[float] | None = None  # one per entry of shards when several sources are mixed
    batch_size: int = 64  # per worker (an elastic run: per worker at train.workers' max; see Config.rank_batch)
    img_size: int = 224
    min_scale: float = 0.08
    shuffle_buffer: int = 1000
    seed: int = 0
    samples_per_epoch: int | None = None  # None = from the shard manifest
    augment: bool = True  # RandomResizedCrop + flip in training (False: resize only, e.g. pre-cropped data)

    def validate(self, key: str) -> None:
        _require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.img_size >= 1, f"{key}.img_size", "must be >= 1")
        _require(0 < self.min_scale <= 1, f"{key}.min_scale", "must be in (0, 1]")
        _require(self.shuffle_buffer >= 0, f"{key}.shuffle_buffer", "must be >= 0")
        if self.weights is not None:
            _require(len(self.weights) == len(self.shards), f"{key}.weights",
                     f"needs one weight per shards entry ({len(self.shards)}), got {len(self.weights)}")
            _require(all(w > 0 for w in self.weights), f"{key}.weights", "must be > 0")


@dataclass
class EvalConfig:
    # held-out sets (KIND:ROOT) scored during training, each rank its share; the first one picks model_best
    datasets: list[str] = field(default_factory=list)
    # scored once, on the final model (the last step), never used to pick a model: e.g. a val set, whose figure is
    # then the final checkpoint's (``eval/<set>/mIoU`` in the last report)
    final_datasets: list[str] = field(default_factory=list)
    oracle: bool = False  # also the oracle-group mIoU (eval/<set>/oracle_mIoU: grouping apart from naming)
    every_epochs: int = 1
    every_steps: int = 0  # > 0: score every this many steps instead of every_epochs
    window: int = 448
    stride: int = 224
    short_side: int = 448
    bg_thresh: float | None = None  # None = the dataset's default (SPEC §6)
    resize: Literal[RESIZE_RULES] = "uint8"  # the protocol's image resize (RESIZE_RULES)

    def validate(self, key: str) -> None:
        _require(self.every_epochs >= 0, f"{key}.every_epochs", "must be >= 0")
        _require(self.every_steps >= 0, f"{key}.every_steps", "must be >= 0")
        for name in ("datasets", "final_datasets"):
            for i, spec in enumerate(getattr(self, name)):
                _require(":" in spec, f"{key}.{name}[{i}]", f"expected KIND:ROOT, got {spec!r}")
        _require(self.window > 0 and 0 < self.stride <= self.window, f"{key}.stride", "must be in (0, window]")
        _require(self.bg_thresh is None or 0 <= self.bg_thresh <= 1, f"{key}.bg_thresh", "must be in [0, 1]")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db (in the working folder)
    experiment: str = "pgseg"
    run_name: str | None = None  # MLflow run name (default: train.name)
    log_every: int = 10  # steps between metric flushes to MLflow (and metric reports to Ray Train)
    log_model: bool = True  # the final model (.safetensors) as an MLflow artifact
    log_models: bool = True  # each kept checkpoint as an MLflow LoggedModel (a pyfunc running the protocol)
    registered_model: str | None = "pgseg"  # the best kept model registered under this name, alias champion; None: no
    champion_metric: str | None = None  # None: the first dev set's eval/<set>/mIoU (higher is better)

    def validate(self, key: str) -> None:
        _require(self.log_every >= 1, f"{key}.log_every", f"must be >= 1, got {self.log_every}")
        for name in ("registered_model", "champion_metric"):
            value = getattr(self, name)
            _require(value is None or bool(value.strip()), f"{key}.{name}", "must not be empty (null: none)")
        _require(self.uri is None or bool(self.uri.strip()), f"{key}.uri", "must not be empty (leave it out for "
                 "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


@dataclass
class TrainConfig:
    # a count, or [min, max]: elastic (Ray Train starts with the workers the cluster has room for, at least min, goes
    # on with fewer from the last checkpoint when a node is lost and grows back when room returns); the global batch
    # stays data.batch_size × max whatever the workers, so the schedule and learning rate do not change
    workers: int | list[int] = 1
    elastic_check_s: float = 60.0  # an elastic run looks this often for room to grow (Ray Train's resize monitor)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # auto: bf16 autocast on a GPU that has it (fp16 with the gradient scaler on one that has not), fp32 on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model (inductor); the matching's host solve stays outside the graph
    seed: int = 0
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 3
    max_failures: int = 0
    storage_path: str = "runs"
    shared_storage: bool = False  # storage_path is a folder every node of the cluster mounts (not needed for URIs)
    # how a checkpoint reaches storage_path: sync (training waits while it is copied), async (a background thread
    # copies it while training goes on; Ray Train records it once stored), auto: async for a URI, sync for a folder
    checkpoint_upload: Literal["auto", "sync", "async"] = "auto"
    init_from: str | None = None  # a checkpoint to initialise from (e.g. GroupViT for the official recipe)
    nonfinite: Literal["skip", "stop"] = "skip"
    name: str | None = None  # the run's name in storage_path: the same name again continues that run
    accelerator_type: str | None = None  # Ray accelerator type for the workers, e.g. A100
    stop_after: int | None = None  # end this invocation after this global step (with a checkpoint); schedule unchanged
    deterministic: bool = False  # ordered data, seeded augmentation, deterministic kernels: reproducible runs
    collective_timeout_s: float = 1800.0  # how long a rank waits in a collective for the others before the run fails

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, list)

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, list) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[-1] if isinstance(self.workers, list) else self.workers

    def validate(self, key: str) -> None:
        _require(not self.elastic or len(self.workers) == 2, f"{key}.workers",
                 f"must be a count or [min, max], got {self.workers}")
        _require(1 <= self.min_workers <= self.max_workers, f"{key}.workers",
                 f"must be >= 1 (and min <= max), got {self.workers}")
        _require(self.elastic_check_s > 0, f"{key}.elastic_check_s", "must be > 0 (seconds)")
        _require(self.collective_timeout_s > 0, f"{key}.collective_timeout_s", "must be > 0 (seconds)")
        _require(self.cpus_per_worker > 0, f"{key}.cpus_per_worker", "must be > 0")
        _require(self.stop_after is None or self.stop_after >= 1, f"{key}.stop_after", "must be >= 1")
        _require(self.name is None or (bool(self.name.strip()) and "/" not in self.name), f"{key}.name",
                 f"must be a non-empty name without '/', got {self.name!r}")
        _require(self.checkpoint_every >= 1, f"{key}.checkpoint_every", "must be >= 1")
        _require(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", "must be >= 1")
        _require(self.max_failures >= -1, f"{key}.max_failures", "must be >= -1 (-1: unlimited)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    npr: NPRConfig = field(default_factory=NPRConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate("model")
        self.npr.validate("npr", self.model.image)
        self.loss.validate("loss")
        self.optim.validate("optim")
        self.schedule.validate("schedule")
        self.data.validate("data")
        self.eval.validate("eval")
        self.tracking.validate("tracking")
        self.train.validate("train")
        t = self.train
        uneven = [w for w in range(t.min_workers, t.max_workers + 1) if self.global_batch % w] if t.elastic else []
        if uneven:  # every world size an elastic run may take must split its global batch evenly
            need = math.lcm(*range(t.min_workers, t.max_workers + 1))
            raise ConfigError(f"data.batch_size: an elastic run keeps its global batch (data.batch_size "
                              f"{self.data.batch_size} × {t.max_workers} max workers = {self.global_batch}) at any "
                              f"number of workers, and it does not split evenly over {uneven[0]} workers; with "
                              f"train.workers {t.workers}, data.batch_size must be a multiple of "
                              f"{need // math.gcd(need, t.max_workers)}")
        return self

    @property
    def global_batch(self) -> int:
        """Images per optimiser step over all workers: data.batch_size × train.workers (its max when elastic)."""
        return self.data.batch_size * self.train.max_workers

    def rank_batch(self, world: int) -> int:
        """Each of ``world`` ranks' share of a step: data.batch_size; in an elastic run the fixed global batch
        over the ranks there are (at max workers, data.batch_size again)."""
        return self.global_batch // world if self.train.elastic else self.data.batch_size
