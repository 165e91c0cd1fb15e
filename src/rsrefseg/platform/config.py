"""The one typed, validated configuration schema.

Every job takes a `Config`. It is built from a YAML recipe plus dotted command-line overrides
(`train.epochs=1 model.lora.sam_rank=8`); an unknown key, a wrong type or an impossible value
raises `ConfigError` naming the dotted key, before any Ray resource is taken. `Config.to_dict()`
gives a plain dict that `Config.from_dict()` reads back unchanged, so the resolved config can be
written next to every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, TypeAdapter
from pydantic import ValidationError, model_validator
from pydantic_core import PydanticCustomError
from pydantic.dataclasses import dataclass

from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.metric_names import METRIC_NAMES

# Validation is pydantic's (v2, already in the dependency tree through Ray, MLflow and DeepSpeed):
# the sections are pydantic dataclasses, so types, ranges, choices and unknown keys are declared on
# the fields and checked in one pass; `_config_error` turns its first error into one line that
# names the dotted key. Types are strict where YAML would otherwise slip through: an integer key
# takes no 1.5, "3" or true; a switch takes only true/false; a number takes an integer and a
# string such as "1e-4" (YAML 1.1 reads an exponent without a dot as a string) but no true/false.
SECTION = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a true/false")
    return value


def _minus_one_or_more(value: float) -> float:
    if value != -1 and value < 0:
        raise ValueError("must be >= 0, or -1")
    return value


# A user name or password in a URI would be recorded wherever the config is (MLflow params, run
# folders, checkpoints, registered models, Tune's trials, a submitted job's command line): refused
# here, before anything is recorded, with where the login goes instead. The message never shows
# the value (`_config_error` shows no input for this error).
CREDENTIALS_IN_URI = "credentials_in_uri"
MLFLOW_LOGIN = ("MLflow reads the login from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN) in the environment of the machine that runs the job (a database store: "
                "its driver's own settings, e.g. PGUSER/PGPASSWORD or ~/.pgpass)")
STORAGE_LOGIN = ("object storage credentials come from the standard AWS settings (AWS_ACCESS_KEY_ID/"
                 "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the node's instance role)")
RAY_LOGIN = "Ray reads its auth token from RAY_AUTH_TOKEN or ~/.ray/auth_token"


def _no_credentials(login: str, *, schemeless_host: bool = False):
    """A validator of a URI-valued key: no `user:password@` (or `user@`) in it. `schemeless_host`:
    a value without a scheme is a host too (a Ray address, `HOST:6379`), not a local path."""
    def check(value: str) -> str:
        from urllib.parse import urlsplit

        if "://" in value:
            host = urlsplit(value).netloc
        else:
            host = value.split("/", 1)[0] if schemeless_host else ""
        if "@" in host:
            raise PydanticCustomError(
                CREDENTIALS_IN_URI,
                "has a user name or password in it (user:password@), which would be recorded with the run; "
                "take it out of the URI: " + login)
        return value

    return AfterValidator(check)


Int = StrictInt
TrackingUri = Annotated[str, _no_credentials(MLFLOW_LOGIN)]
StorageUri = Annotated[str, _no_credentials(STORAGE_LOGIN)]
ArtifactUri = Annotated[str, _no_credentials(f"{STORAGE_LOGIN}; for an MLflow server, {MLFLOW_LOGIN}")]
Bool = StrictBool
Number = Annotated[float, BeforeValidator(_not_a_bool)]
Rank = Annotated[Int, Field(ge=1, description="use *_layers=zero to turn LoRA off")]
Layers = Literal["full", "half", "zero"]


# --------------------------------------------------------------------------------------------
# Sections


@dataclass(config=SECTION)
class LoraConfig:
    """LoRA placement and ranks, one rank per component (paper default r=16 everywhere).

    Keys left empty (None) take the value of `model.variant` (VARIANTS below)."""

    sam_rank: Rank = 16
    siglip_vision_rank: Rank = 16
    siglip_text_rank: Rank = 16
    sam_layers: Layers = "full"
    siglip_vision_layers: Layers = "full"
    siglip_text_layers: Layers = "full"
    # LoRA scale alpha/r: alpha = alpha_over_rank * rank, unless `alpha` is set (> 0).
    alpha_over_rank: Annotated[Number, Field(gt=0)] = 1.0
    # A fixed alpha for every rank (the authors' code: 16, so r=8 scales by 2 and r=32 by 0.5);
    # 0 = alpha_over_rank * rank (paper variant: alpha = r).
    alpha: Optional[Annotated[Number, Field(ge=0, description="0 = alpha_over_rank * rank")]] = None
    # Dropout on the LoRA input (paper variant 0.0; the authors' code 0.1).
    dropout: Optional[Annotated[Number, Field(ge=0, lt=1)]] = None
    # Also put LoRA on the SigLIP text tower's `head`, the projection that gives t_global
    # (paper variant: no; the authors' code: yes). Never with siglip_text_layers=zero.
    text_head: Optional[Bool] = None
    # Which layers "half" adapts: the last ceil(depth/2) (paper variant: 14 of SigLIP's 27) or
    # the last floor(depth/2) (the authors' code: 13 of 27).
    half_depth: Optional[Literal["ceil", "floor"]] = None

    def alpha_for(self, rank: int) -> float:
        """The LoRA alpha of an adapter of this rank."""
        return self.alpha if self.alpha else self.alpha_over_rank * rank


@dataclass(config=SECTION)
class PrompterConfig:
    """AttnPrompter: downsampling rate 2^k of the sparse branch, and the dense-prompt switch."""

    downsample_rate: Literal[2, 4, 8] = 4
    dense_prompt: Bool = True
    # Sparse branch (models/prompter.py). paper: 1x1 conv, then k x [3x3 stride-2 Conv-BN-GELU],
    # tokens leave a GELU. official (the authors' code): 1x1 conv-BN-GELU, plus SAM's dense
    # positional encoding on the SigLIP grid, the k blocks, then a plain 1x1 conv, so tokens are
    # unrestricted like SAM's point embeddings.
    sparse_branch: Optional[Literal["paper", "official"]] = None
    # Gating. paper: v_global = v*s_g + v, v_local = v*mean(s_l) + v, cat(global, local, v).
    # official: v_global = v*s_g, v_local = (v + v*mean(s_l)) / 2, cat(local, global, v).
    gating: Optional[Literal["paper", "official"]] = None


@dataclass(config=SECTION)
class Rsrefseg2Config:
    """RSRefSeg-2's own keys (model.arch=rsrefseg2; ignored by RSRefSeg): the cascaded prompter's
    depths and token counts, its loss terms beyond BCE and Dice, and SAM 2.1's evaluation switch.
    The defaults are the authors' (KyanChen/RSRefSeg2, configs_RSRefSeg2/*)."""

    # Text-pooled queries Q1 and Q2 (3 each) and the blocks where they attend to the text and to
    # each other (2); 0 blocks = the queries are the pooled text as it comes.
    text_queries: Annotated[Int, Field(ge=1)] = 3
    query_blocks: Annotated[Int, Field(ge=0)] = 2
    # Stage one (the image attends to Q1) and stage two (the image to Q2, the prompt tokens to Q2
    # and the image): blocks each; 0 skips the stage (stage two's prompt tokens then stay as
    # initialised, so keep it >= 1).
    stage1_blocks: Annotated[Int, Field(ge=0)] = 2
    stage2_blocks: Annotated[Int, Field(ge=1)] = 2
    # Learnable prompt tokens that become SAM 2.1's sparse prompts.
    prompt_tokens: Annotated[Int, Field(ge=1)] = 9
    # The dense branch: the refined SigLIP map scored against the pooled text as a mask prompt
    # (off: SAM 2.1's no-mask embedding).
    dense_prompt: Bool = True
    # Loss = model.bce_weight * BCE + model.dice_weight * Dice + decorrelation_weight *
    # mean(cos^2(mean Q1, mean Q2)) + contrastive_weight * the CLIP-style loss between the mask-
    # pooled SigLIP map and mean Q2 over the batch of all workers (0 = the term is off).
    decorrelation_weight: Annotated[Number, Field(ge=0)] = 0.5
    contrastive_weight: Annotated[Number, Field(ge=0)] = 0.5
    # The text tower's input: `longest` trims each batch's tokens to its longest phrase, as the
    # authors' tokenizer call (padding=True) does: the queries' average pooling and the text
    # cross-attention then see a phrase and few pads, and the pooled last position is a pad of
    # the shorter phrases. `max_length` keeps the pipeline's 64 positions (what SigLIP 2 was
    # trained on), which makes a phrase's features independent of its batch.
    text_padding: Literal["longest", "max_length"] = "longest"
    # SAM 2.1's builder turns on `dynamic_multimask_via_stability`: in eval, a single-mask call
    # whose mask is unstable switches to the best of the three multimask outputs, which training
    # never optimises. Off here: evaluation scores the mask training optimised (docs/training.md).
    dynamic_multimask: Bool = False


@dataclass(config=SECTION)
class ModelConfig:
    # The architecture: RSRefSeg (SigLIP + AttnPrompter + SAM, 2024) or RSRefSeg-2 (SigLIP 2 +
    # the cascaded prompter + SAM 2.1, 2025). Default rsrefseg: configs and checkpoints written
    # before this key existed mean what they meant.
    arch: Literal["rsrefseg", "rsrefseg2"] = "rsrefseg"
    # tiny: toy sizes of either architecture (CPU). rsrefseg-b/-l: RSRefSeg with SAM ViT-B/L.
    # rsrefseg2-t/-s/-b+/-l: RSRefSeg-2 with SAM 2.1 Hiera tiny/small/base_plus/large.
    preset: Literal["tiny", "rsrefseg-b", "rsrefseg-l", "rsrefseg2-t", "rsrefseg2-s", "rsrefseg2-b+",
                    "rsrefseg2-l"] = "tiny"
    # Local Hugging Face directory of SigLIP (google/siglip-so400m-patch14-384) or, for RSRefSeg-2,
    # SigLIP 2 (google/siglip2-so400m-patch16-512); real presets.
    siglip_path: Optional[StorageUri] = None
    # Official checkpoint: segment-anything's sam_vit_b_01ec64.pth / sam_vit_l_0b3195.pth, or
    # SAM 2.1's sam2.1_hiera_{tiny,small,base_plus,large}.pt; real presets.
    sam_checkpoint: Optional[StorageUri] = None
    # Seed of the random initialisation of the `tiny` backbones: a tiny checkpoint holds only the
    # trainable weights, so the frozen random backbone must be rebuilt bit for bit from this seed.
    init_seed: Int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompter: PrompterConfig = field(default_factory=PrompterConfig)
    rsrefseg2: Rsrefseg2Config = field(default_factory=Rsrefseg2Config)
    # Which reading of RSRefSeg the keys left empty (None) follow: `paper` (the paper's text) or
    # `official` (the authors' code, KyanChen/RSRefSeg, which produced the published numbers).
    # A key given explicitly always wins. The table is VARIANTS below; README lists every key.
    # Default paper: run configs written before this key existed rebuild the model they trained.
    variant: Literal["paper", "official"] = "paper"
    # Positive-class weight of the binary cross-entropy (1.0 = plain BCE, as in the paper).
    bce_pos_weight: Annotated[Number, Field(gt=0)] = 1.0
    # Loss = bce_weight * BCE + dice_weight * Dice. paper variant: BCE weight 1; the authors' code
    # 5. dice_weight 0 = the paper's plain BCE; RSRefSeg-2 adds Dice (weight 1).
    bce_weight: Optional[Annotated[Number, Field(ge=0)]] = None
    # Empty: 0 for RSRefSeg, 5 for RSRefSeg-2 (its authors' weight).
    dice_weight: Optional[Annotated[Number, Field(ge=0, description="0 = no Dice term")]] = None
    # SAM's prompt encoder trains (the authors' code) or stays frozen (paper variant). Of it,
    # only what the forward uses gets gradients: the mask-prompt convs that embed the dense
    # prompt (or the no-mask embedding with dense_prompt off).
    train_prompt_encoder: Optional[Bool] = None
    # SAM's ViT attention through fused scaled_dot_product_attention (same math, less memory).
    sdpa_attention: Bool = True
    # With sdpa_attention (ignored without it): fold SAM's relative-position bias into q/k, so no
    # N x N bias tensor is built and SDPA runs without an attn_mask (models/fast_attention.py;
    # 1.4x a step on an H100).
    fold_rel_pos: Bool = True
    # Recompute backbone blocks in backward instead of storing their activations (bigger GPU
    # batches for about one extra backbone forward; see models/activation_checkpointing.py).
    activation_checkpointing: Bool = False
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


DatasetPath = Annotated[str, Field(min_length=1, description="the folder `rsrefseg prepare` wrote"),
                        _no_credentials(STORAGE_LOGIN)]
# A source's label: part of metric names (val/<source>/gIoU) and of dotted keys.
SourceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]


@dataclass(config=SECTION)
class SourceConfig:
    """One prepared dataset of a mixture (data.sources.<name>)."""

    path: DatasetPath
    # Share of each training epoch: source i contributes weight_i / (sum of weights) of the
    # epoch's rows (docs/training.md, "Mixed datasets").
    weight: Annotated[Number, Field(gt=0)] = 1.0


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A source as the jobs read it: data.sources' entries, or data.path alone (name "")."""

    name: str
    path: str
    weight: float = 1.0


@dataclass(config=SECTION)
class DataConfig:
    # A prepared dataset: the folder `rsrefseg prepare` wrote (manifest.json + Parquet shards).
    # Ignored when data.sources names datasets.
    path: DatasetPath = "data/demo/prepared"
    # Several prepared datasets in one run, by name: {name: {path, weight}}. Empty = data.path
    # alone. Training draws each epoch from them by weight; validation and evaluate report each
    # source and the mixture. Dotted keys reach each one: data.sources.rrsisd.weight=2.
    sources: dict[SourceName, SourceConfig] = field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "val"
    # Label resolution (masks are compared at this size); 0 = the preset's default.
    label_size: Annotated[Int, Field(ge=0)] = 0
    # Light augmentation (horizontal/vertical flips); off by default, as in the paper.
    augment: Bool = False
    # Control experiment: shuffle phrases across images, so the model cannot use the text.
    shuffle_phrases: Bool = False
    # Rows of each train worker's local shuffle buffer (0 = 4 x its batch). Shards hold the
    # phrases of one image next to each other (as RefSegRS and RRSIS-D list them), so a small
    # buffer fills batches with one image under several phrases; a larger one mixes images, at
    # the memory of that many preprocessed rows (~30 KiB each at `tiny`, ~3.5 MiB at rsrefseg-b).
    shuffle_buffer: Annotated[Int, Field(ge=0, description="0 = 4 x the batch")] = 0
    # A train job preprocesses a split (decode, resize, tokenize) once and keeps the rows in Ray's
    # object store when they fit in this many MiB (0 = never): every epoch then only reads them.
    # `tiny`'s rows are ~30 KiB (a 1,200-triplet demo: ~30 MiB); rsrefseg-b's ~3.5 MiB, so real
    # datasets stream from the shards every epoch, in flat memory.
    cache_mib: Annotated[Int, Field(ge=0, description="0 = never")] = 512
    # Cap on samples per split (0 = all); handy for smoke runs on a real dataset.
    limit: Annotated[Int, Field(ge=0)] = 0
    # Where images stored as shipped (JPEG, PNG: docs/datasets.md, "Prepared shards") are
    # decoded: `cpu` in Ray Data's read/preprocess tasks (a JPEG larger than the SAM input at
    # reduced size); `gpu`: JPEGs not larger than the SAM input travel as their files and are
    # decoded, batched, on the consumer's device (torchvision.io.decode_jpeg: nvJPEG on a GPU),
    # which takes their decoding off the CPUs and ~9/10 of their bytes off the object store.
    decode: Literal["cpu", "gpu"] = "cpu"

    def source_list(self) -> list[DataSource]:
        """The datasets the run reads: data.sources in their order, else data.path (name "")."""
        if not self.sources:
            return [DataSource("", self.path)]
        return [DataSource(name, s.path, float(s.weight)) for name, s in self.sources.items()]

    def source_path_keys(self) -> list[str]:
        """The dotted keys of the dataset paths this config reads."""
        return [f"data.sources.{name}.path" for name in self.sources] or ["data.path"]


@dataclass(config=SECTION)
class TrainConfig:
    epochs: Annotated[Int, Field(ge=1)] = 200
    # Global batch size, split evenly over the workers (paper: 32).
    batch_size: Annotated[Int, Field(ge=1)] = 32
    lr: Annotated[Number, Field(gt=0)] = 1e-4
    # AdamW weight decay (paper variant 0.01, torch's default; the authors' code 0.05).
    weight_decay: Optional[Annotated[Number, Field(ge=0)]] = None
    # AdamW's second-moment decay (beta1 stays 0.9). torch's and the authors' 0.999 remembers
    # about 1,000 steps of small gradients, so one sudden large gradient moves a weight by several
    # times the lr; 0.95 forgets within about 20 steps and bounds such a step near the lr (the
    # demo: README, Performance).
    adam_beta2: Annotated[Number, Field(gt=0, lt=1)] = 0.999
    # Linear warm-up over warmup_epochs from warmup_start_factor * lr (paper variant 0: from
    # nothing; the authors' code 0.01), then cosine down to min_lr_factor * lr (paper variant 0;
    # the authors' code 0.001), the cosine stepping every step (paper variant) or once per epoch
    # (the authors' code).
    warmup_epochs: Annotated[Number, Field(ge=0)] = 1.0
    warmup_start_factor: Optional[Annotated[Number, Field(ge=0, le=1)]] = None
    min_lr_factor: Optional[Annotated[Number, Field(ge=0, le=1)]] = None
    cosine_per: Optional[Literal["step", "epoch"]] = None
    # Between the warm-up and the cosine, the lr may stay flat: the cosine starts at this fraction
    # of train.epochs (or right after the warm-up, if that is later). Empty: 0 (RSRefSeg); 0.1 for
    # RSRefSeg-2, as its authors schedule it.
    cosine_start: Optional[Annotated[Number, Field(ge=0, lt=1)]] = None
    # The cosine's period T_max as a multiple of train.epochs; 0 = from its start to the last
    # epoch, so the lr ends at min_lr_factor. RSRefSeg-2's authors set 1.3 or 1.8 (by commit) with
    # the schedule cut at the last epoch, where the lr is then still 0.2-0.5 x (docs/training.md).
    cosine_length: Annotated[Number, Field(ge=0, description="0 = to the last epoch")] = 0.0
    num_workers: Annotated[Int, Field(ge=1)] = 2
    use_gpu: Bool = False
    gpus_per_worker: Annotated[Number, Field(gt=0)] = 1.0
    cpus_per_worker: Annotated[Number, Field(gt=0)] = 1.0
    # auto = bf16 on GPUs that have it (fp16 with loss scaling otherwise), fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    zero_stage: Literal[0, 1, 2] = 2
    # AdamW's fused kernel (one launch for all parameters instead of several per tensor).
    fused_adamw: Bool = True
    # Clip the global gradient norm to this value; 0 = no clipping (the authors' recipe), and
    # then DeepSpeed skips computing the norm: one reduction per trainable tensor per step, a
    # quarter of an RSRefSeg-b step on an H100 together with the check below (README).
    grad_clip: Annotated[Number, Field(ge=0, description="0 = no clipping")] = 0.0
    # bf16 only: check every gradient for inf/NaN and skip such steps (DeepSpeed's
    # bf16.check_grad_overflow; fp16 always checks, for loss scaling). Off, as in plain PyTorch
    # training: bf16 has fp32's range, and the check costs several launches per trainable tensor.
    skip_nonfinite_steps: Bool = False
    seed: Int = 0
    # CPUs that must stay free for Ray Data's preprocessing (one per task) once the train workers
    # hold theirs; a job that would leave fewer fails before training (platform/capacity.py).
    ingest_cpus: Annotated[Int, Field(ge=1, description="each preprocessing task takes a CPU")] = 1
    # A worker that waits this long for its next batch (training, validation, evaluation) fails
    # with the cluster's free resources instead of waiting forever; 0 = wait forever.
    batch_timeout_s: Annotated[Number, Field(ge=0, description="0 = wait forever")] = 600.0
    log_every_n_steps: Annotated[Int, Field(ge=1)] = 10
    max_failures: Annotated[Int, Field(ge=-1, description="-1 = retry forever")] = 0
    # How often Ray Train's controller polls the workers (its RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    # Ray's default 2 s): a finished run is noticed, and `rsrefseg train` returns, up to one
    # interval after the last worker is done (the demo idled 3.4 s there at 2 s; README,
    # Performance); a poll is one small call to each worker.
    poll_interval_s: Annotated[Number, Field(gt=0)] = 0.5
    # Where Ray Train keeps run folders and checkpoints; relative paths are under the project.
    storage_path: StorageUri = "runs"
    # Validation figures: how many samples to draw in the per-epoch prediction figure.
    figure_samples: Annotated[Int, Field(ge=0)] = 4
    # Register the best checkpoint as this MLflow model name when the run finishes ("" = don't).
    register_as: str = ""


@dataclass(config=SECTION)
class TuneConfig:
    # Trials running at once (0 = as many as the cluster fits).
    max_concurrent_trials: Annotated[Int, Field(ge=0)] = 1
    # Resources of one trial's workers, when they differ from the train section's (a trial is one
    # train run): 0 CPUs / -1 GPUs / 0 workers = as train.* says. Fractions are allowed (several
    # trials per GPU); a GPU count > 0 trains on GPUs, 0 on CPUs.
    cpus_per_worker: Annotated[Number, Field(ge=0, description="0 = train.cpus_per_worker")] = 0.0
    gpus_per_worker: Annotated[Number, AfterValidator(_minus_one_or_more)] = -1.0
    num_workers: Annotated[Int, Field(ge=0, description="0 = train.num_workers")] = 0
    # Early stopping for wide grids: none, or ASHA on `metric`.
    scheduler: Literal["none", "asha"] = "none"
    grace_period: Annotated[Int, Field(ge=1)] = 1
    reduction_factor: Annotated[Int, Field(ge=2)] = 3
    # The one selection metric (higher is better): it picks every run's best epoch (the `best/`
    # checkpoint, train and tune alike), the sweep's best trial, and what ASHA compares.
    metric: Literal[tuple(f"val/{name}" for name in METRIC_NAMES)] = "val/gIoU"  # type: ignore[valid-type]
    # Retries of a failed trial before it is marked failed (workers inside a trial restart on
    # their own per train.max_failures).
    max_failures: Annotated[Int, Field(ge=-1, description="-1 = retry forever")] = 0
    # Experiment folder name under train.storage_path; empty = derived from the sweep file name.
    name: str = ""


@dataclass(config=SECTION)
class TrackingConfig:
    # Empty = the project-local SQLite store, sqlite:///<project>/mlflow.db.
    uri: TrackingUri = ""
    experiment: str = "rsrefseg"
    # Artifact root for new experiments; empty = mlartifacts/ beside a SQLite store (<project>/mlartifacts
    # for the default store), the server's own for an http:// store.
    artifact_location: ArtifactUri = ""
    run_name: str = ""
    enabled: Bool = True
    # Seconds between system-metric samples (CPU, memory, disk, network; GPU utilization and
    # memory where there is a GPU), logged by one train worker per node; 0 = off.
    system_metrics_s: Annotated[Number, Field(ge=0, description="0 = off")] = 10.0


@dataclass(config=SECTION)
class ClusterConfig:
    # Ray address: empty = start (or join) a local Ray; "auto" or ray://host:10001 for a cluster.
    address: Annotated[str, _no_credentials(RAY_LOGIN, schemeless_host=True)] = ""
    # Resources of the local Ray when one is started here (0 = Ray's own detection).
    num_cpus: Annotated[Int, Field(ge=0)] = 0
    num_gpus: Annotated[Int, Field(ge=0)] = 0
    namespace: str = "rsrefseg"
    # Refuse (train) or scale down (tune) jobs whose train workers would leave Ray Data no CPU;
    # off for an autoscaling cluster whose nodes are not up yet when the job starts.
    check_capacity: Bool = True


@dataclass(config=SECTION)
class EvaluateConfig:
    # Model replicas of `rsrefseg evaluate` (and of `predict` on a folder), as Ray Data actors:
    # 0 = one per GPU when the cluster has GPUs, else one CPU replica.
    replicas: Annotated[Int, Field(ge=0, description="0 = one per GPU, else one")] = 0
    # GPUs each replica takes: -1 = 1 when the cluster has GPUs, else 0 (CPU replicas).
    gpus_per_replica: Annotated[Number, AfterValidator(_minus_one_or_more)] = -1
    batch_size: Annotated[Int, Field(ge=1)] = 8  # samples per model call of a replica
    gallery: Annotated[Int, Field(ge=0)] = 4  # the k worst and k best samples, as a figure in MLflow (0 = none)


@dataclass(config=SECTION)
class PathsConfig:
    # The folder that relative paths resolve against (data.path, model.siglip_path,
    # model.sam_checkpoint, train.storage_path, a relative sqlite:/// tracking.uri,
    # tracking.artifact_location). Empty = the project folder: $RSREFSEG_HOME, else the working
    # directory. On a cluster: where the nodes hold data/ and weights/ (cluster.yaml:
    # /home/ray/rsrefseg); see platform/paths.py.
    root: str = ""


@dataclass(config=SECTION)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    @model_validator(mode="after")
    def _across_keys(self) -> "Config":
        """What no single key can check. The message starts with the key to change."""
        t, m = self.train, self.model
        if t.batch_size % t.num_workers:
            raise ValueError(f"train.batch_size: {t.batch_size} does not split evenly over "
                             f"train.num_workers={t.num_workers}")
        if not t.use_gpu and t.precision not in ("auto", "fp32"):
            raise ValueError(f"train.precision: {t.precision} needs a GPU (train.use_gpu=true); CPU training "
                             "runs in fp32")
        if m.bce_weight is not None and m.dice_weight is not None and m.bce_weight + m.dice_weight <= 0:
            raise ValueError("model.bce_weight: and model.dice_weight are both 0: no loss")
        if m.arch == "rsrefseg2":
            for key in ("activation_checkpointing", "compile_backbones", "channels_last"):
                if getattr(m, key) is True:
                    raise ValueError(f"model.{key}: a speed switch of RSRefSeg's backbones; model.arch=rsrefseg2 "
                                     "does not read it (leave it at auto/false)")
        preset_arch = "rsrefseg2" if m.preset.startswith("rsrefseg2-") else "rsrefseg" if m.preset != "tiny" else m.arch
        if preset_arch != m.arch:
            raise ValueError(f"model.preset: {m.preset} is a preset of the {preset_arch} architecture, but "
                             f"model.arch is {m.arch}; set model.arch={preset_arch} or pick a {m.arch} preset")
        return self

    def validate(self) -> "Config":
        """Check the config as it will run: with model.variant's keys filled in (each key is
        checked as it is set; `resolved()` checks the filled-in values)."""
        self.resolved()
        return self

    def resolved(self) -> "Config":
        """A copy with every key left empty (None) filled in from `model.variant` (VARIANTS).

        The config itself keeps the empty keys, so `model.variant=official` given later (an
        override, a sweep axis) still moves the whole group; what runs reads `resolved()`."""
        data = self.to_dict()
        # The architecture's own defaults first (RSRefSeg-2 has one recipe), then the variant's.
        defaults = {**VARIANTS[self.model.variant], **ARCH_DEFAULTS[self.model.arch]}
        for key, value in defaults.items():
            section, *path = key.split(".")
            node = data[section]
            for part in path[:-1]:
                node = node[part]
            if node[path[-1]] is None:
                node[path[-1]] = value
        return _validate(data, source=f"model.variant={self.model.variant}")

    # -- conversion ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> "Config":
        return _validate(data or {}, source=source).validate()

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
        "train.cosine_start": 0.0,
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
        "train.cosine_start": 0.0,
    },
}


# model.arch: what RSRefSeg-2's authors set (KyanChen/RSRefSeg2, refseg/models/models.py and
# configs_RSRefSeg2/*), over model.variant's values (variant reads RSRefSeg's paper or code).
# A key given explicitly still wins.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "rsrefseg": {"model.dice_weight": 0.0},
    "rsrefseg2": {
        "model.bce_weight": 5.0,
        "model.dice_weight": 5.0,
        "model.train_prompt_encoder": True,
        "model.lora.text_head": True,
        "model.lora.dropout": 0.0,
        "model.lora.alpha": 16.0,
        "model.lora.half_depth": "floor",
        "train.weight_decay": 0.05,
        "train.warmup_start_factor": 0.01,
        "train.min_lr_factor": 0.01,
        "train.cosine_per": "epoch",
        "train.cosine_start": 0.1,
    },
}


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        data = read_yaml(path, what="a mapping of sections")
        source = str(path)
    apply_overrides(data, overrides or [])
    return Config.from_dict(data, source=source)


def read_yaml(path: str | os.PathLike, *, what: str = "a mapping") -> dict[str, Any]:
    """The one YAML reader of configs, sweep files and checkpoint configs: a mapping at the top
    (an empty file is an empty one), or a ConfigError naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be {what}, got {type(data).__name__}")
    return data


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


_ADAPTER: TypeAdapter | None = None


def _validate(data: Any, *, source: str) -> "Config":
    """A Config from plain data, validated; the first problem as a ConfigError naming its key."""
    global _ADAPTER
    if not isinstance(data, dict):
        raise ConfigError(f"the top level: expected a mapping of sections, got {type(data).__name__} ({source})")
    _ADAPTER = _ADAPTER or TypeAdapter(Config)
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise _config_error(exc.errors()[0], source) from None


_PHRASES = {
    "int_type": "expected an integer", "int_from_float": "expected an integer", "int_parsing": "expected an integer",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "float_type": "expected a number", "float_parsing": "expected a number", "finite_number": "expected a number",
    "string_type": "expected a string", "dataclass_type": "expected a mapping of keys",
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}", "less_than": "must be < {lt}",
    "literal_error": "must be one of {expected}", "string_too_short": "must not be empty",
    "string_pattern_mismatch": "must match {pattern} (letters, digits, _ and -)", "missing": "missing",
    "dict_type": "expected a mapping of keys",
}


def _config_error(error: dict, source: str) -> ConfigError:
    loc = [str(part) for part in error["loc"] if part != "[key]"]  # a mapping's key: named by itself
    key = ".".join(loc)
    if error["type"] == CREDENTIALS_IN_URI:  # the message, never the value
        return ConfigError(f"{key}: {error['msg']} ({source})")
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = ", ".join(sorted(_fields(loc[:-1])))
        return ConfigError(f"{key}: unknown key ({source}); known keys here: {known}")
    if error["type"] == "value_error":
        message = str(error["ctx"]["error"])
        if not loc:  # a check across keys: its message starts with the key
            return ConfigError(message)
    else:
        message = _PHRASES.get(error["type"], error["msg"]).format(**(error.get("ctx") or {}))
    hint = getattr(_fields(loc[:-1]).get(loc[-1]), "description", None) if loc else None
    return ConfigError(f"{key}: {message}{f' ({hint})' if hint else ''}; got {error.get('input')!r}")


def _fields(loc: list[str]) -> dict:
    """The pydantic fields of the section at `loc` (the top level for [])."""
    section: Any = Config
    parts = iter(loc)
    for part in parts:
        info = getattr(section, "__pydantic_fields__", {}).get(part)
        if info is None:
            return {}
        section = info.annotation
        if getattr(section, "__origin__", None) is dict:  # a mapping by name (data.sources): skip the name
            section = section.__args__[1]
            next(parts, None)
    return dict(getattr(section, "__pydantic_fields__", {}))
