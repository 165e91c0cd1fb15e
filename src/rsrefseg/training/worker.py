"""The per-worker training function that Ray Train runs: `train_func(config)`.

Each worker builds the model, hands its trainable parameters to DeepSpeed ZeRO-2, consumes its
shard of the Ray Data stream, validates every epoch (metrics reduced across workers), and
reports a checkpoint (DeepSpeed engine state for resume + trainable weights for inference).
Rank 0 alone talks to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from rsrefseg.models.device_inputs import model_batch
from rsrefseg.inference.scoring import score
from rsrefseg.models.sizes import InputSizes
from rsrefseg.platform import runs
from rsrefseg.platform.config import Config
from rsrefseg.training.engine import build_engine, train_step


@dataclass
class LoopState:
    """What a resumed worker needs besides the DeepSpeed engine state."""

    epoch: int = 0  # last finished epoch (1-based; 0 = none)
    global_step: int = 0
    history: list[dict] = field(default_factory=list)  # per-epoch val metrics


@dataclass
class Worker:
    """One train worker's set-up: what its steps, validation and checkpoints need."""

    cfg: Config  # resolved (model.variant's keys filled in)
    engine: object  # the DeepSpeed engine
    scheduler: object
    device: torch.device
    precision: str
    rank: int
    world: int
    steps_per_epoch: int
    sizes: InputSizes  # what the device-side preprocessing resizes to

    @property
    def micro_batch(self) -> int:
        return self.cfg.train.batch_size // self.world


def setup(cfg: Config, *, rank: int, world: int, steps_per_epoch: int, device: torch.device) -> Worker:
    """The model and its DeepSpeed engine, seeded per rank."""
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.build import build_model

    train = cfg.train
    torch.manual_seed(train.seed + rank)
    model = build_model(cfg.model, label_size=cfg.data.label_size, gpu=train.use_gpu)
    engine, scheduler, precision = build_engine(model, train, world_size=world, steps_per_epoch=steps_per_epoch)
    # On CPU DeepSpeed keeps the module where it is; on GPU it moved it to the local device.
    device = engine.device if train.use_gpu else device
    sizes = input_sizes(cfg.model, cfg.data.label_size)
    return Worker(cfg, engine, scheduler, device, precision, rank, world, steps_per_epoch, sizes)


def restore(worker: Worker, checkpoint) -> LoopState:
    """The engine state and loop state of a Ray Train checkpoint (a resumed or restarted run);
    a fresh LoopState without one."""
    from rsrefseg.training.safe_resume import load_engine_state

    if checkpoint is None:
        return LoopState()
    with private_copy(checkpoint) as ckpt_dir:
        # Not engine.load_checkpoint itself: it unpickles whatever the run store holds.
        load_engine_state(worker.engine, os.path.join(ckpt_dir, runs.DEEPSPEED_DIR), tag=runs.DEEPSPEED_TAG)
        return LoopState(**json.loads(Path(ckpt_dir, runs.STATE_FILE).read_text()))


@contextlib.contextmanager
def private_copy(checkpoint):
    """The checkpoint's files in a local folder that only this process writes: the folder itself
    when it is local, else a download of it into a temporary folder of this process.

    Not `checkpoint.as_directory()`: every process of a host downloads a remote checkpoint into
    the same folder, and a worker that tries the folder's lock after the first download finished
    takes it and downloads again, rewriting the files while the first worker reads them (a
    restart from `s3://` failed that way with EOFError in torch.load, two workers on one host)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="rsrefseg-restore-") as tmp:
        yield checkpoint.to_directory(tmp)


def train_epoch(worker: Worker, shard, epoch: int, state: LoopState, *, on_log) -> None:
    """One pass over this worker's shard: optimizer steps, with `on_log(stats, step)` every
    train.log_every_n_steps steps and at the end of the epoch."""
    from rsrefseg.datasets.pipeline import iter_batches
    from rsrefseg.platform.capacity import describe_resources

    cfg, train = worker.cfg, worker.cfg.train
    worker.engine.train()
    window_loss = torch.zeros((), device=worker.device)
    window_terms: dict = {}
    window_steps, window_samples, window_t0 = 0, 0, time.perf_counter()
    for batch in iter_batches(shard, worker.micro_batch, shuffle_seed=train.seed + epoch, drop_last=True,
                              local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                              timeout_s=train.batch_timeout_s, on_timeout=describe_resources):
        inputs = model_batch(batch, worker.sizes, worker.device, augment=cfg.data.augment)
        # Accumulate on device; `.item()` (a host sync) only at logging intervals.
        window_loss += train_step(worker.engine, inputs, window_terms)
        state.global_step += 1
        window_steps += 1
        window_samples += len(batch["id"]) * worker.world
        if state.global_step % train.log_every_n_steps == 0:
            on_log(_window_stats(window_loss, window_terms, window_steps, window_samples, window_t0,
                                 worker.scheduler), state.global_step)
            window_loss.zero_()
            window_terms.clear()
            window_steps, window_samples, window_t0 = 0, 0, time.perf_counter()
    if window_steps:  # the tail of the epoch
        on_log(_window_stats(window_loss, window_terms, window_steps, window_samples, window_t0, worker.scheduler),
               state.global_step)


def save_and_report(worker: Worker, state: LoopState, metrics: dict) -> None:
    """One Ray Train checkpoint of the epoch, reported with its metrics. Every rank writes its
    own ZeRO partition of the optimizer state; Ray merges the ranks' folders into one checkpoint.
    Rank 0 adds the model checkpoint (trainable weights + model config) and the loop state.
    Frozen backbones are not saved."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="rsrefseg-ckpt-") as tmp:
        worker.engine.save_checkpoint(os.path.join(tmp, runs.DEEPSPEED_DIR), tag=runs.DEEPSPEED_TAG,
                                      exclude_frozen_parameters=True)
        if worker.rank == 0:
            from rsrefseg.models.checkpoint import save_checkpoint

            save_checkpoint(worker.engine.module, worker.cfg, os.path.join(tmp, runs.MODEL_DIR))
            Path(tmp, runs.STATE_FILE).write_text(json.dumps(state.__dict__))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def train_func(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. `loop_config` carries the config as a dict plus run
    context (MLflow run id, steps per epoch) so nothing is read from globals."""
    import ray.train

    from rsrefseg.models.metrics import SegMetrics
    from rsrefseg.platform.console import say
    from rsrefseg.training.progress import Progress
    from rsrefseg.training.reporting import EpochLogger, SystemMetrics

    cfg = Config.from_dict(loop_config["config"]).resolved()  # model.variant's keys filled in
    train = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker = setup(cfg, rank=rank, world=world, steps_per_epoch=int(loop_config["steps_per_epoch"]),
                   device=ray.train.torch.get_device() if train.use_gpu else torch.device("cpu"))
    state = restore(worker, ray.train.get_checkpoint())
    if rank == 0 and state.epoch:
        say(f"resumed after epoch {state.epoch} (step {state.global_step})")

    run_id = loop_config.get("mlflow_run_id")
    logger = EpochLogger(cfg, run_id, enabled=rank == 0)
    system = SystemMetrics(cfg, run_id, enabled=ctx.get_local_rank() == 0, resume=state.epoch > 0)
    trainable_n, total_n = worker.engine.module.parameter_counts()
    logger.log_run_info(trainable=trainable_n, total=total_n, nodes=_worker_nodes(world),
                        precision=worker.precision, zero_stage=worker.engine.zero_optimization_stage())
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    progress = Progress(total_epochs=train.epochs, steps_per_epoch=worker.steps_per_epoch, enabled=rank == 0)

    def on_log(stats: dict, step: int) -> None:
        logger.log_step(stats, step)
        progress.step(step, stats)

    try:
        for epoch in range(state.epoch + 1, train.epochs + 1):
            progress.start_epoch(epoch)
            train_epoch(worker, train_shard, epoch, state, on_log=on_log)
            metrics, examples = validate(worker.engine, val_shard, worker.micro_batch, worker.device, worker.sizes,
                                         SegMetrics, keep=train.figure_samples if rank == 0 else 0,
                                         timeout_s=train.batch_timeout_s, sources=tuple(cfg.data.sources))
            metrics = {f"val/{k}": v for k, v in metrics.items()}
            metrics["epoch"] = epoch
            state.epoch = epoch
            state.history.append(metrics)
            progress.end_epoch(epoch, metrics)
            save_and_report(worker, state, metrics)
            # Logged after the checkpoint is committed, and skipped if already logged, so a resumed
            # run neither loses nor repeats an epoch in MLflow.
            logger.log_epoch(metrics, epoch, examples)
    except BaseException:
        # Flush what rank 0 queued for MLflow, so the run shows how far it got; the error that
        # stopped training is the one raised, not a store's.
        logger.close(check=False)
        system.close()
        raise
    logger.close()
    system.close()


def _window_stats(loss_sum, term_sums: dict, steps: int, samples: int, t0: float, scheduler) -> dict:
    """Mean loss (and each weighted term of it, as train/loss_<term>), learning rate and
    throughput over the steps since the last log line."""
    elapsed = time.perf_counter() - t0
    stats = {
        "train/loss": float(loss_sum.item()) / steps,
        "train/lr": scheduler.get_last_lr()[0],
        "train/samples_per_s": samples / max(elapsed, 1e-9),
    }
    stats.update({f"train/loss_{name}": float(total) / steps for name, total in term_sums.items()})
    return stats


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank (recorded, so a run shows where its workers ran)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


@torch.no_grad()
def validate(engine, shard, batch_size: int, device, sizes: InputSizes, metrics_cls, *, keep: int = 0,
             timeout_s: float = 0.0, sources: tuple[str, ...] = ()):
    """Metrics over this worker's share of the split, summed over all workers: of every sample
    (a mixture's: the mixture), and as `<source>/<metric>` of each of `sources`.

    Scored as `rsrefseg evaluate` scores (`inference.scoring.score`: each sample at its image's
    own size). Returns (metrics dict, this worker's `keep` worst then `keep`
    best samples by IoU, for the prediction figure)."""
    engine.eval()
    from rsrefseg.datasets.pipeline import iter_batches
    from rsrefseg.inference.gallery import Gallery
    from rsrefseg.models.metrics import GroupedMetrics
    from rsrefseg.platform.capacity import describe_resources

    acc = GroupedMetrics(sources, factory=metrics_cls)
    gallery = Gallery(keep)
    for batch in iter_batches(shard, batch_size, timeout_s=timeout_s, on_timeout=describe_resources):
        acc.add_records(score(engine, batch, sizes, device, empty_iou=acc.empty_iou, gallery=gallery))
    if dist.is_initialized():
        # One all-reduce of the metric sums: every sample counted once over all workers.
        acc.reduce(device if dist.get_backend() == "nccl" else "cpu")
    return acc.compute(), gallery.examples()

