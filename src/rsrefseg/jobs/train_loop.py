"""The per-worker training function that Ray Train runs: `train_func(config)`.

Each worker builds the model, hands its trainable parameters to DeepSpeed ZeRO-2, consumes its
shard of the Ray Data stream, validates every epoch (metrics reduced across workers), and
reports a checkpoint (DeepSpeed engine state for resume + trainable weights for inference).
Rank 0 alone talks to MLflow.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from rsrefseg.models.inference import model_inputs, predict_logits, score_batch, to_device
from rsrefseg.platform.config import Config, TrainConfig

# Names inside one reported checkpoint directory.
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
MODEL_DIR = "model"
STATE_FILE = "state.json"


@dataclass
class LoopState:
    """What a resumed worker needs besides the DeepSpeed engine state."""

    epoch: int = 0  # last finished epoch (1-based; 0 = none)
    global_step: int = 0
    history: list[dict] = field(default_factory=list)  # per-epoch val metrics


def resolve_precision(train: TrainConfig) -> str:
    if train.precision != "auto":
        return train.precision
    if train.use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cast_for_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Cast the whole module, buffers included, to the engine's half precision (in place).

    DeepSpeed's bf16/fp16 modes cast the parameters only; float32 buffers (SAM's positional-
    encoding matrix, the prompter's BatchNorm statistics) then meet half-precision weights in one
    op and the first forward fails. fp32 leaves the model as it is."""
    dtype = HALF_DTYPES.get(precision)
    return model if dtype is None else model.to(dtype)


def deepspeed_config(train: TrainConfig, world_size: int, precision: str) -> dict:
    """ZeRO stage 2 over the trainable parameters; the optimizer is ours (torch AdamW)."""
    zero = {
        "stage": train.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": bool(train.use_gpu),
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if train.grad_clip == 0 and train.zero_stage in (1, 2):
        # Nothing reads the norm: skip its per-tensor reductions (measured on an H100, README).
        zero["compute_grad_norm"] = False
    bf16 = {"enabled": precision == "bf16"}
    if not train.skip_nonfinite_steps:
        bf16["check_grad_overflow"] = False
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        # torch.optim.AdamW is a client optimizer; ZeRO partitions its state all the same.
        "zero_allow_untested_optimizer": True,
        "bf16": bf16,
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; DeepSpeed takes it as a client optimizer and ZeRO
    partitions its state (the fused kernel runs on each rank's flat partition)."""
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=train.fused_adamw)


def warmup_cosine(
    total_steps: int, warmup_steps: int, *, start_factor: float = 0.0, min_factor: float = 0.0,
    steps_per_epoch: int = 0,
):
    """LambdaLR factor: linear warm-up from `start_factor` to the base lr, then cosine decay to
    `min_factor`. With `steps_per_epoch`, the cosine moves once per epoch (the authors' recipe:
    per-epoch cosine after a per-step warm-up); without, every step."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return start_factor + (1.0 - start_factor) * (step + 1) / warmup_steps
        at = (step // steps_per_epoch) * steps_per_epoch if steps_per_epoch else step
        progress = max(0.0, (at - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def lr_schedule(train: TrainConfig, steps_per_epoch: int):
    """The LambdaLR factor of a resolved train config."""
    return warmup_cosine(
        steps_per_epoch * train.epochs,
        int(round(train.warmup_epochs * steps_per_epoch)),
        start_factor=train.warmup_start_factor,
        min_factor=train.min_lr_factor,
        steps_per_epoch=steps_per_epoch if train.cosine_per == "epoch" else 0,
    )


def train_func(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. `loop_config` carries the resolved config as a dict
    plus run context (MLflow run id, dataset sizes) so nothing is read from globals."""
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from rsrefseg.datasets.pipeline import iter_batches
    from rsrefseg.models.metrics import SegMetrics
    from rsrefseg.platform.capacity import describe_resources
    from rsrefseg.models.rsrefseg import build_model
    from rsrefseg.jobs.progress import Progress, say
    from rsrefseg.jobs.val_report import EpochLogger, SystemMetrics

    cfg = Config.from_dict(loop_config["config"]).resolved()  # model.variant's keys filled in
    train = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")
    precision = resolve_precision(train)

    torch.manual_seed(train.seed + rank)
    model = cast_for_precision(build_model(cfg.model, label_size=cfg.data.label_size, gpu=train.use_gpu), precision)
    trainable = [p for p in model.parameters() if p.requires_grad]

    steps_per_epoch = int(loop_config["steps_per_epoch"])
    optimizer = build_optimizer(trainable, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(train, steps_per_epoch))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(train, world, precision),
        dist_init_required=False,  # Ray Train already set up the process group
    )
    # On CPU DeepSpeed keeps the module where it is; on GPU it moved it to the local device.
    device = engine.device if train.use_gpu else device

    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(
                os.path.join(ckpt_dir, DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False
            )
            state = LoopState(**json.loads(Path(ckpt_dir, STATE_FILE).read_text()))
        if rank == 0:
            say(f"[rsrefseg] resumed after epoch {state.epoch} (step {state.global_step})")

    logger = EpochLogger(cfg, loop_config.get("mlflow_run_id"), enabled=rank == 0)
    system = SystemMetrics(cfg, loop_config.get("mlflow_run_id"), enabled=ctx.get_local_rank() == 0,
                           resume=state.epoch > 0)
    trainable_n, total_n = model.parameter_counts()
    logger.log_run_info(trainable=trainable_n, total=total_n, nodes=_worker_nodes(world),
                        precision=precision, zero_stage=engine.zero_optimization_stage())
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    micro_batch = train.batch_size // world
    progress = Progress(total_epochs=train.epochs, steps_per_epoch=steps_per_epoch, enabled=rank == 0)

    for epoch in range(state.epoch + 1, train.epochs + 1):
        engine.train()
        progress.start_epoch(epoch)
        window_loss = torch.zeros((), device=device)
        window_steps, window_samples, window_t0 = 0, 0, time.perf_counter()
        for batch in iter_batches(train_shard, micro_batch, shuffle_seed=train.seed + epoch, drop_last=True,
                                  local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                  timeout_s=train.batch_timeout_s, on_timeout=describe_resources):
            batch = to_device(batch, device)
            logits = engine(**model_inputs(batch))
            loss = engine.module.loss(logits.float(), batch["mask"])
            engine.backward(loss)
            engine.step()
            state.global_step += 1
            # Accumulate on device; `.item()` (a host sync) only at logging intervals.
            window_loss += loss.detach()
            window_steps += 1
            window_samples += batch["mask"].shape[0] * world
            if state.global_step % train.log_every_n_steps == 0:
                stats = _window_stats(window_loss, window_steps, window_samples, window_t0, scheduler)
                logger.log_step(stats, state.global_step)
                progress.step(state.global_step, stats)
                window_loss.zero_()
                window_steps, window_samples, window_t0 = 0, 0, time.perf_counter()
        if window_steps:  # the tail of the epoch
            stats = _window_stats(window_loss, window_steps, window_samples, window_t0, scheduler)
            logger.log_step(stats, state.global_step)
            progress.step(state.global_step, stats)

        metrics, examples = validate(engine, val_shard, micro_batch, device, SegMetrics,
                                     keep=train.figure_samples if rank == 0 else 0, timeout_s=train.batch_timeout_s)
        metrics = {f"val/{k}": v for k, v in metrics.items()}
        metrics["epoch"] = epoch
        state.epoch = epoch
        state.history.append(metrics)
        progress.end_epoch(epoch, metrics)

        with tempfile.TemporaryDirectory(prefix="rsrefseg-ckpt-") as tmp:
            # Every rank writes its own ZeRO partition of the optimizer state; Ray merges the
            # ranks' directories into one checkpoint. Frozen backbones are not saved.
            engine.save_checkpoint(os.path.join(tmp, DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                   exclude_frozen_parameters=True)
            if rank == 0:
                from rsrefseg.models.checkpoint import save_checkpoint

                save_checkpoint(engine.module, cfg, os.path.join(tmp, MODEL_DIR))
                Path(tmp, STATE_FILE).write_text(json.dumps(state.__dict__))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        # Logged after the checkpoint is committed, and skipped if already logged, so a resumed
        # run neither loses nor repeats an epoch in MLflow.
        logger.log_epoch(metrics, epoch, examples)

    logger.close()
    system.close()


def _window_stats(loss_sum, steps: int, samples: int, t0: float, scheduler) -> dict:
    """Mean loss, learning rate and throughput over the steps since the last log line."""
    elapsed = time.perf_counter() - t0
    return {
        "train/loss": float(loss_sum.item()) / steps,
        "train/lr": scheduler.get_last_lr()[0],
        "train/samples_per_s": samples / max(elapsed, 1e-9),
    }


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank (recorded, so a run shows where its workers ran)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


@torch.no_grad()
def validate(engine, shard, batch_size: int, device, metrics_cls, *, keep: int = 0, timeout_s: float = 0.0):
    """Metrics over this worker's share of the split, summed over all workers.

    Scored like `rsrefseg evaluate` (`score_batch`: at each image's own size when the stream
    carries the original masks). Returns (metrics dict, this worker's `keep` worst then `keep`
    best samples by IoU, for the prediction figure)."""
    engine.eval()
    from rsrefseg.datasets.pipeline import iter_batches
    from rsrefseg.platform.capacity import describe_resources

    from rsrefseg.jobs.val_report import Gallery

    acc = metrics_cls()
    gallery = Gallery(keep)
    for batch in iter_batches(shard, batch_size, timeout_s=timeout_s, on_timeout=describe_resources):
        logits = predict_logits(engine, batch, device)
        records = score_batch(logits, batch, empty_iou=acc.empty_iou)
        acc.add(torch.tensor(records["intersection"]), torch.tensor(records["union"]))
        gallery.offer(batch, logits > 0, records["iou"])
    if dist.is_initialized():
        # One all-reduce of the metric sums: every sample counted once over all workers.
        acc.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(acc.state)
    return acc.compute(), gallery.examples()

