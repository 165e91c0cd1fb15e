"""The one typed, validated configuration schema.

Every job takes a `Config`. It is built from a YAML recipe plus dotted command-line overrides
(`train.epochs=1 model.lora.sam_rank=8`); an unknown key, a wrong type or an impossible value
raises `ConfigError` naming the dotted key, before any Ray resource is taken. `Config.to_dict()`
gives a plain dict that `Config.from_dict()` reads back unchanged, so the resolved config can be
written next to every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rsrefseg.platform.errors import ConfigError  # noqa: F401 (raised here; importers take it from here too)

PRESETS = ("tiny", "rsrefseg-b", "rsrefseg-l")
LAYER_CHOICES = ("full", "half", "zero")
DOWNSAMPLE_RATES = (2, 4, 8)


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class LoraConfig:
    """LoRA placement and ranks, one rank per component (paper default r=16 everywhere).

    Keys left empty (None) take the value of `model.variant` (VARIANTS below)."""

    sam_rank: int = 16
    siglip_vision_rank: int = 16
    siglip_text_rank: int = 16
    sam_layers: Literal["full", "half", "zero"] = "full"
    siglip_vision_layers: Literal["full", "half", "zero"] = "full"
    siglip_text_layers: Literal["full", "half", "zero"] = "full"
    # LoRA scale alpha/r: alpha = alpha_over_rank * rank, unless `alpha` is set (> 0).
    alpha_over_rank: float = 1.0
    # A fixed alpha for every rank (the authors' code: 16, so r=8 scales by 2 and r=32 by 0.5);
    # 0 = alpha_over_rank * rank (paper variant: alpha = r).
    alpha: Optional[float] = None
    # Dropout on the LoRA input (paper variant 0.0; the authors' code 0.1).
    dropout: Optional[float] = None
    # Also put LoRA on the SigLIP text tower's `head`, the projection that gives t_global
    # (paper variant: no; the authors' code: yes). Never with siglip_text_layers=zero.
    text_head: Optional[bool] = None
    # Which layers "half" adapts: the last ceil(depth/2) (paper variant: 14 of SigLIP's 27) or
    # the last floor(depth/2) (the authors' code: 13 of 27).
    half_depth: Optional[Literal["ceil", "floor"]] = None

    def validate(self, key: str) -> None:
        for name in ("sam_rank", "siglip_vision_rank", "siglip_text_rank"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1 (use *_layers=zero to turn LoRA off)")
        _check(self.alpha_over_rank > 0, f"{key}.alpha_over_rank", "must be > 0")
        _check(self.alpha >= 0, f"{key}.alpha", "must be >= 0 (0 = alpha_over_rank * rank)")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", "must be in [0, 1)")

    def alpha_for(self, rank: int) -> float:
        """The LoRA alpha of an adapter of this rank."""
        return self.alpha if self.alpha else self.alpha_over_rank * rank


@dataclass
class PrompterConfig:
    """AttnPrompter: downsampling rate 2^k of the sparse branch, and the dense-prompt switch."""

    downsample_rate: int = 4
    dense_prompt: bool = True
    # Sparse branch (models/prompter.py). paper: 1x1 conv, then k x [3x3 stride-2 Conv-BN-GELU],
    # tokens leave a GELU. official (the authors' code): 1x1 conv-BN-GELU, plus SAM's dense
    # positional encoding on the SigLIP grid, the k blocks, then a plain 1x1 conv, so tokens are
    # unrestricted like SAM's point embeddings.
    sparse_branch: Optional[Literal["paper", "official"]] = None
    # Gating. paper: v_global = v*s_g + v, v_local = v*mean(s_l) + v, cat(global, local, v).
    # official: v_global = v*s_g, v_local = (v + v*mean(s_l)) / 2, cat(local, global, v).
    gating: Optional[Literal["paper", "official"]] = None

    def validate(self, key: str) -> None:
        _check(
            self.downsample_rate in DOWNSAMPLE_RATES,
            f"{key}.downsample_rate",
            f"must be one of {DOWNSAMPLE_RATES}, got {self.downsample_rate}",
        )


@dataclass
class ModelConfig:
    preset: Literal["tiny", "rsrefseg-b", "rsrefseg-l"] = "tiny"
    # Local Hugging Face directory of SigLIP (e.g. google/siglip-so400m-patch14-384), real presets.
    siglip_path: Optional[str] = None
    # Official segment-anything checkpoint (sam_vit_b_01ec64.pth / sam_vit_l_0b3195.pth), real presets.
    sam_checkpoint: Optional[str] = None
    # Seed of the random initialisation of the `tiny` backbones: a tiny checkpoint holds only the
    # trainable weights, so the frozen random backbone must be rebuilt bit for bit from this seed.
    init_seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompter: PrompterConfig = field(default_factory=PrompterConfig)
    # Which reading of RSRefSeg the keys left empty (None) follow: `paper` (the paper's text) or
    # `official` (the authors' code, KyanChen/RSRefSeg, which produced the published numbers).
    # A key given explicitly always wins. The table is VARIANTS below; README lists every key.
    # Default paper: run configs written before this key existed rebuild the model they trained.
    variant: Literal["paper", "official"] = "paper"
    # Positive-class weight of the binary cross-entropy (1.0 = plain BCE, as in the paper).
    bce_pos_weight: float = 1.0
    # Loss = bce_weight * BCE + dice_weight * Dice. paper variant: BCE weight 1; the authors' code
    # 5. dice_weight 0 = the paper's plain BCE; RSRefSeg-2 adds Dice (weight 1).
    bce_weight: Optional[float] = None
    dice_weight: float = 0.0
    # SAM's prompt encoder trains (the authors' code) or stays frozen (paper variant). Of it,
    # only what the forward uses gets gradients: the mask-prompt convs that embed the dense
    # prompt (or the no-mask embedding with dense_prompt off).
    train_prompt_encoder: Optional[bool] = None
    # SAM's ViT attention through fused scaled_dot_product_attention (same math, less memory).
    sdpa_attention: bool = True
    # With sdpa_attention (ignored without it): fold SAM's relative-position bias into q/k, so no
    # N x N bias tensor is built and SDPA runs without an attn_mask (models/fast_attention.py;
    # 1.4x a step on an H100).
    fold_rel_pos: bool = True
    # Recompute backbone blocks in backward instead of storing their activations (bigger GPU
    # batches for about one extra backbone forward; see models/activation_checkpointing.py).
    activation_checkpointing: bool = False
    # torch.compile the backbone towers (compile time on the first step; see
    # models/compiled_backbones.py). auto = on where the model runs on a GPU, where it pays back
    # (README, Performance); on CPU it only adds compile time.
    compile_backbones: Literal["auto", True, False] = "auto"
    # Convolution weights and input images in channels-last (NHWC) memory format; auto = on GPU.
    channels_last: Literal["auto", True, False] = "auto"

    def resolved(self) -> "ModelConfig":
        """This section with the keys left empty filled in from `variant` (Config.resolved)."""
        return Config(model=self).resolved().model

    def on_device(self, gpu: bool) -> "ModelConfig":
        """This config with the `auto` switches decided for a model that runs on a GPU or not."""
        def decide(value):
            return gpu if value == "auto" else value

        return dataclasses.replace(
            self, compile_backbones=decide(self.compile_backbones), channels_last=decide(self.channels_last)
        )

    def validate(self, key: str) -> None:
        self.lora.validate(f"{key}.lora")
        self.prompter.validate(f"{key}.prompter")
        _check(self.bce_pos_weight > 0, f"{key}.bce_pos_weight", "must be > 0")
        _check(self.bce_weight >= 0, f"{key}.bce_weight", "must be >= 0")
        _check(self.dice_weight >= 0, f"{key}.dice_weight", "must be >= 0 (0 = no Dice term)")
        _check(self.bce_weight + self.dice_weight > 0, f"{key}.bce_weight", "and model.dice_weight are both 0: no loss")


@dataclass
class DataConfig:
    # A prepared dataset: the folder `rsrefseg prepare` wrote (manifest.json + Parquet shards).
    path: str = "data/demo/prepared"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Label resolution (masks are compared at this size); 0 = the preset's default.
    label_size: int = 0
    # Light augmentation (horizontal/vertical flips); off by default, as in the paper.
    augment: bool = False
    # Control experiment: shuffle phrases across images, so the model cannot use the text.
    shuffle_phrases: bool = False
    # Rows of each train worker's local shuffle buffer (0 = 4 x its batch). Shards hold the
    # phrases of one image next to each other (as RefSegRS and RRSIS-D list them), so a small
    # buffer fills batches with one image under several phrases; a larger one mixes images, at
    # the memory of that many preprocessed rows (~30 KiB each at `tiny`, ~3.5 MiB at rsrefseg-b).
    shuffle_buffer: int = 0
    # Cap on samples per split (0 = all); handy for smoke runs on a real dataset.
    limit: int = 0

    def validate(self, key: str) -> None:
        _check(bool(self.path), f"{key}.path", "must name a prepared dataset folder")
        _check(self.label_size >= 0, f"{key}.label_size", "must be >= 0")
        _check(self.limit >= 0, f"{key}.limit", "must be >= 0")
        _check(self.shuffle_buffer >= 0, f"{key}.shuffle_buffer", "must be >= 0 (0 = 4 x the batch)")


@dataclass
class TrainConfig:
    epochs: int = 200
    # Global batch size, split evenly over the workers (paper: 32).
    batch_size: int = 32
    lr: float = 1e-4
    # AdamW weight decay (paper variant 0.01, torch's default; the authors' code 0.05).
    weight_decay: Optional[float] = None
    # Linear warm-up over warmup_epochs from warmup_start_factor * lr (paper variant 0: from
    # nothing; the authors' code 0.01), then cosine down to min_lr_factor * lr (paper variant 0;
    # the authors' code 0.001), the cosine stepping every step (paper variant) or once per epoch
    # (the authors' code).
    warmup_epochs: float = 1.0
    warmup_start_factor: Optional[float] = None
    min_lr_factor: Optional[float] = None
    cosine_per: Optional[Literal["step", "epoch"]] = None
    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    # auto = bf16 on GPUs that have it (fp16 with loss scaling otherwise), fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    zero_stage: int = 2
    # AdamW's fused kernel (one launch for all parameters instead of several per tensor).
    fused_adamw: bool = True
    # Clip the global gradient norm to this value; 0 = no clipping (the authors' recipe), and
    # then DeepSpeed skips computing the norm: one reduction per trainable tensor per step, a
    # quarter of an RSRefSeg-b step on an H100 together with the check below (README).
    grad_clip: float = 0.0
    # bf16 only: check every gradient for inf/NaN and skip such steps (DeepSpeed's
    # bf16.check_grad_overflow; fp16 always checks, for loss scaling). Off, as in plain PyTorch
    # training: bf16 has fp32's range, and the check costs several launches per trainable tensor.
    skip_nonfinite_steps: bool = False
    seed: int = 0
    # CPUs that must stay free for Ray Data's preprocessing (one per task) once the train workers
    # hold theirs; a job that would leave fewer fails before training (platform/capacity.py).
    ingest_cpus: int = 1
    # A worker that waits this long for its next batch (training, validation, evaluation) fails
    # with the cluster's free resources instead of waiting forever; 0 = wait forever.
    batch_timeout_s: float = 600.0
    log_every_n_steps: int = 10
    max_failures: int = 0
    # Where Ray Train keeps run folders and checkpoints; relative paths are under the project.
    storage_path: str = "runs"
    # Validation figures: how many samples to draw in the per-epoch prediction figure.
    figure_samples: int = 4
    # Register the best checkpoint as this MLflow model name when the run finishes ("" = don't).
    register_as: str = ""

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1, f"{key}.epochs", "must be >= 1")
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        _check(self.num_workers >= 1, f"{key}.num_workers", "must be >= 1")
        _check(
            self.batch_size % self.num_workers == 0,
            f"{key}.batch_size",
            f"{self.batch_size} does not split evenly over train.num_workers={self.num_workers}",
        )
        _check(self.lr > 0, f"{key}.lr", "must be > 0")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 = no clipping)")
        _check(self.ingest_cpus >= 1, f"{key}.ingest_cpus", "must be >= 1 (each preprocessing task takes a CPU)")
        _check(self.batch_timeout_s >= 0, f"{key}.batch_timeout_s", "must be >= 0 (0 = wait forever)")
        _check(self.warmup_epochs >= 0, f"{key}.warmup_epochs", "must be >= 0")
        _check(0 <= self.warmup_start_factor <= 1, f"{key}.warmup_start_factor", "must be in [0, 1]")
        _check(0 <= self.min_lr_factor <= 1, f"{key}.min_lr_factor", "must be in [0, 1]")
        _check(self.gpus_per_worker > 0, f"{key}.gpus_per_worker", "must be > 0")
        _check(self.cpus_per_worker > 0, f"{key}.cpus_per_worker", "must be > 0")
        _check(self.zero_stage in (0, 1, 2), f"{key}.zero_stage", "must be 0, 1 or 2")
        _check(self.log_every_n_steps >= 1, f"{key}.log_every_n_steps", "must be >= 1")
        _check(self.max_failures >= -1, f"{key}.max_failures", "must be >= -1 (-1 = retry forever)")
        _check(self.figure_samples >= 0, f"{key}.figure_samples", "must be >= 0")
        if not self.use_gpu:
            _check(
                self.precision in ("auto", "fp32"),
                f"{key}.precision",
                f"{self.precision} needs a GPU (train.use_gpu=true); CPU training runs in fp32",
            )


@dataclass
class TuneConfig:
    # Trials running at once (0 = as many as the cluster fits).
    max_concurrent_trials: int = 1
    # Resources of one trial's workers, when they differ from the train section's (a trial is one
    # train run): 0 CPUs / -1 GPUs / 0 workers = as train.* says. Fractions are allowed (several
    # trials per GPU); a GPU count > 0 trains on GPUs, 0 on CPUs.
    cpus_per_worker: float = 0.0
    gpus_per_worker: float = -1.0
    num_workers: int = 0
    # Early stopping for wide grids: none, or ASHA on `metric`.
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = 1
    reduction_factor: int = 3
    # The one selection metric (higher is better): it picks every run's best epoch (the `best/`
    # checkpoint, train and tune alike), the sweep's best trial, and what ASHA compares.
    metric: Literal[
        "val/gIoU", "val/cIoU", "val/Pr@0.5", "val/Pr@0.6", "val/Pr@0.7", "val/Pr@0.8", "val/Pr@0.9"
    ] = "val/gIoU"
    # Retries of a failed trial before it is marked failed (workers inside a trial restart on
    # their own per train.max_failures).
    max_failures: int = 0
    # Experiment folder name under train.storage_path; empty = derived from the sweep file name.
    name: str = ""

    def validate(self, key: str) -> None:
        _check(self.max_concurrent_trials >= 0, f"{key}.max_concurrent_trials", "must be >= 0")
        _check(self.cpus_per_worker >= 0, f"{key}.cpus_per_worker", "must be >= 0 (0 = train.cpus_per_worker)")
        _check(self.gpus_per_worker == -1 or self.gpus_per_worker >= 0, f"{key}.gpus_per_worker",
               "must be >= 0, or -1 (= train.gpus_per_worker with train.use_gpu, else 0)")
        _check(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0")
        _check(self.max_failures >= -1, f"{key}.max_failures", "must be >= -1 (-1 = retry forever)")
        _check(self.grace_period >= 1, f"{key}.grace_period", "must be >= 1")
        _check(self.reduction_factor >= 2, f"{key}.reduction_factor", "must be >= 2")


@dataclass
class TrackingConfig:
    # Empty = the project-local SQLite store, sqlite:///<project>/mlflow.db.
    uri: str = ""
    experiment: str = "rsrefseg"
    # Artifact root for new experiments; empty = mlartifacts/ beside a SQLite store (<project>/mlartifacts
    # for the default store), the server's own for an http:// store.
    artifact_location: str = ""
    run_name: str = ""
    enabled: bool = True
    # Seconds between system-metric samples (CPU, memory, disk, network; GPU utilization and
    # memory where there is a GPU), logged by one train worker per node; 0 = off.
    system_metrics_s: float = 10.0


@dataclass
class ClusterConfig:
    # Ray address: empty = start (or join) a local Ray; "auto" or ray://host:10001 for a cluster.
    address: str = ""
    # Resources of the local Ray when one is started here (0 = Ray's own detection).
    num_cpus: int = 0
    num_gpus: int = 0
    namespace: str = "rsrefseg"
    # Refuse (train) or scale down (tune) jobs whose train workers would leave Ray Data no CPU;
    # off for an autoscaling cluster whose nodes are not up yet when the job starts.
    check_capacity: bool = True

    def validate(self, key: str) -> None:
        _check(self.num_cpus >= 0, f"{key}.num_cpus", "must be >= 0")
        _check(self.num_gpus >= 0, f"{key}.num_gpus", "must be >= 0")


@dataclass
class EvaluateConfig:
    # Model replicas of `rsrefseg evaluate` (and of `predict` on a folder), as Ray Data actors:
    # 0 = one per GPU when the cluster has GPUs, else one CPU replica.
    replicas: int = 0
    # GPUs each replica takes: -1 = 1 when the cluster has GPUs, else 0 (CPU replicas).
    gpus_per_replica: float = -1
    batch_size: int = 8  # samples per model call of a replica
    gallery: int = 4  # the k worst and k best samples, as a figure in MLflow (0 = none)

    def validate(self, key: str) -> None:
        _check(self.replicas >= 0, f"{key}.replicas", "must be >= 0 (0 = one per GPU, else one)")
        _check(self.gpus_per_replica == -1 or self.gpus_per_replica >= 0, f"{key}.gpus_per_replica", "must be >= 0, or -1 (decide)")
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        _check(self.gallery >= 0, f"{key}.gallery", "must be >= 0")


@dataclass
class PathsConfig:
    # The folder that relative paths resolve against (data.path, model.siglip_path,
    # model.sam_checkpoint, train.storage_path, a relative sqlite:/// tracking.uri,
    # tracking.artifact_location). Empty = the project folder: $RSREFSEG_HOME, else the working
    # directory. On a cluster: where the nodes hold data/ and weights/ (cluster.yaml:
    # /home/ray/rsrefseg); see platform/paths.py.
    root: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def validate(self) -> "Config":
        resolved = self.resolved()
        for f in dataclasses.fields(resolved):
            section = getattr(resolved, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        return self

    def resolved(self) -> "Config":
        """A copy with every key left empty (None) filled in from `model.variant` (VARIANTS).

        The config itself keeps the empty keys, so `model.variant=official` given later (an
        override, a sweep axis) still moves the whole group; what runs reads `resolved()`."""
        data = self.to_dict()
        for key, value in VARIANTS[self.model.variant].items():
            section, *path = key.split(".")
            node = data[section]
            for part in path[:-1]:
                node = node[part]
            if node[path[-1]] is None:
                node[path[-1]] = value
        return _build(Config, data, prefix="", source=f"model.variant={self.model.variant}")

    # -- conversion ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> "Config":
        cfg = _build(cls, data or {}, prefix="", source=source)
        return cfg.validate()

    def flat(self) -> dict[str, Any]:
        """Dotted names to values, variant keys resolved: the MLflow params of a run (the same
        names for every run)."""
        return flatten(self.resolved().to_dict())

    def dump(self, path: str | os.PathLike) -> Path:
        """Write the resolved config as YAML (write, then rename)."""
        from rsrefseg.platform.atomic import write_text

        return write_text(path, self.to_yaml())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, overrides: list[str] | dict[str, Any]) -> "Config":
        """A copy with dotted overrides applied (and validated)."""
        data = self.to_dict()
        apply_overrides(data, overrides)
        return Config.from_dict(data)


# --------------------------------------------------------------------------------------------
# model.variant: what each reading of RSRefSeg sets. `paper` is this platform's model as first
# built from the paper's text; `official` is the authors' code (KyanChen/RSRefSeg,
# rsris/models/models.py and configs_RSRefSeg/RSRefSeg-b.py). Optimizer and schedule keys sit in
# `train` but belong to the recipe that produced the numbers, so the variant sets them too.

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {
        "model.prompter.sparse_branch": "paper",
        "model.prompter.gating": "paper",
        "model.train_prompt_encoder": False,
        "model.lora.text_head": False,
        "model.lora.dropout": 0.0,
        "model.lora.alpha": 0.0,
        "model.lora.half_depth": "ceil",
        "model.bce_weight": 1.0,
        "train.weight_decay": 0.01,
        "train.warmup_start_factor": 0.0,
        "train.min_lr_factor": 0.0,
        "train.cosine_per": "step",
    },
    "official": {
        "model.prompter.sparse_branch": "official",
        "model.prompter.gating": "official",
        "model.train_prompt_encoder": True,
        "model.lora.text_head": True,
        "model.lora.dropout": 0.1,
        "model.lora.alpha": 16.0,
        "model.lora.half_depth": "floor",
        "model.bce_weight": 5.0,
        "train.weight_decay": 0.05,
        "train.warmup_start_factor": 0.01,
        "train.min_lr_factor": 0.001,
        "train.cosine_per": "epoch",
    },
}


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        source = str(path)
    apply_overrides(data, overrides or [])
    return Config.from_dict(data, source=source)


def parse_override(item: str) -> tuple[str, Any]:
    """`train.epochs=3` -> ("train.epochs", 3). Values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    apply_overrides(out, flat)
    return out


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _build(cls: type, data: Any, *, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} ({source})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key ({source}); known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, key=f"{prefix}{name}", source=source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".", source=source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key=key, source=source)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; users write learning rates that way.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a schema bug, not user input
