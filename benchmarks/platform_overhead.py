"""Platform overhead: a recipe's training steps as a plain PyTorch loop and through `rsrefseg train`,
same steps, same data, same machine, one run.

* plain: one process, no Ray. The recipe's model, optimizer and learning-rate schedule
  (`training.engine`), its global batch over the same prepared train split (read with pyarrow,
  decoded and resized by the pipeline's own `Preprocessor`, inside the timed loop), for exactly
  the optimizer steps the platform takes (its steps per epoch x epochs). Nothing else: no
  validation, no checkpoints, no MLflow.
* platform: `rsrefseg train` on the same config, timed from the call to its return: Ray start,
  Ray Data streams, Ray Train workers running DeepSpeed ZeRO-2, validation and a checkpoint per
  epoch, MLflow logging, the best checkpoint copied out.

    python benchmarks/platform_overhead.py                              # configs/demo.yaml, 1,200 triplets
    python benchmarks/platform_overhead.py --size 300 train.epochs=2    # a quicker look

Prints both wall times, their ratio, and where the platform's time went (per epoch, from the
run's MLflow metrics: training steps vs. the rest).

`--engines` adds what the gradient exchange costs, without Ray: the same steps in
train.num_workers processes (gloo, train.cpus_per_worker threads each, as Ray gives a train
worker), each on its share of the global batch, three ways: no exchange at all (each process
steps alone: the floor for this split of the work), torch DDP, and the train job's DeepSpeed
ZeRO-2 engine (`training.engine`, what a Ray Train worker steps).

    python benchmarks/platform_overhead.py --engines
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]


def prepared_dataset(work: Path, size: int, seed: int) -> Path:
    from rsrefseg.datasets.prepare import prepare_dataset
    from rsrefseg.datasets.synthetic import generate

    raw = generate(work / "raw", size=size, seed=seed)
    out = work / "prepared"
    prepare_dataset("synthetic", raw, out)
    return out


def train_rows(path: Path, split: str, limit: int) -> list[dict]:
    """The split's rows in the prepared order (the platform reads the same rows, shuffled)."""
    from rsrefseg.datasets.prepare import load_manifest

    manifest = load_manifest(path)
    rows: list[dict] = []
    for shard in manifest["shards"][split]:
        table = pq.read_table(path / shard["path"], columns=["id", "phrase", "category", "image", "mask", "height", "width"])
        rows.extend(table.to_pylist())
    return rows[:limit] if limit else rows


def global_batches(rows: int, batch_size: int, steps: int, seed: int):
    """Row indices of each of `steps` global batches: a fresh permutation every epoch, its
    partial last batch dropped (as the train job's workers do)."""
    if rows < batch_size:
        raise ValueError(f"{rows} rows make no batch of {batch_size}")
    rng = np.random.default_rng(seed)
    done = 0
    while True:
        order = rng.permutation(rows)
        for start in range(0, rows - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


def eager_step(model, net, train, optimizer, scheduler=None):
    """One optimizer step of plain PyTorch on a batch of model inputs: `net` is the model itself
    or a wrapper of it (DDP); clipping as the train config says."""
    from rsrefseg.inference.scoring import model_inputs

    params = [p for p in model.parameters() if p.requires_grad]

    def step(inputs: dict) -> None:
        loss = model.loss(net(**model_inputs(inputs)).float(), inputs["mask"])
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    return step


def plain_loop(cfg, rows: list[dict], steps: int, steps_per_epoch: int) -> float:
    """Seconds for `steps` optimizer steps of the recipe's model on batches of its global size,
    decoding included; the schedule and optimizer are the train job's."""
    from rsrefseg.datasets.pipeline import Preprocessor
    from rsrefseg.models.device_inputs import model_batch
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.build import build_model
    from rsrefseg.models.tokenizer import load_tokenizer
    from rsrefseg.training.engine import build_optimizer, lr_schedule

    train = cfg.train
    torch.manual_seed(train.seed)
    model = build_model(cfg.model, label_size=cfg.data.label_size)
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(train, steps_per_epoch))
    step = eager_step(model, model, train, optimizer, scheduler)
    sizes = input_sizes(cfg.model, cfg.data.label_size)
    prep = Preprocessor(sizes=sizes, tokenizer=load_tokenizer(cfg.model))
    t0 = time.perf_counter()
    for picked in global_batches(len(rows), train.batch_size, steps, train.seed):
        batch = prep(pa.Table.from_pylist([rows[i] for i in picked]))
        step(model_batch(batch, sizes, "cpu", augment=cfg.data.augment))
    return time.perf_counter() - t0


ENGINES = ("independent", "ddp", "deepspeed")


def engine_loop(rank: int, world: int, kind: str, cfg_dict: dict, steps: int, steps_per_epoch: int,
                port: int, out) -> None:
    """One of `world` processes stepping the recipe's model on its share of each global batch;
    `kind` says how gradients are exchanged. Rank 0 puts the wall seconds of the steps on `out`."""
    import torch.distributed as dist

    from rsrefseg.datasets.pipeline import Preprocessor
    from rsrefseg.models.device_inputs import model_batch
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.build import build_model
    from rsrefseg.models.tokenizer import load_tokenizer
    from rsrefseg.platform.config import Config
    from rsrefseg.training.engine import build_engine, build_optimizer, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    cfg = Config.from_dict(cfg_dict)
    train = cfg.train
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(train.seed + rank)
    model = build_model(cfg.model, label_size=cfg.data.label_size)
    model.train()
    sizes = input_sizes(cfg.model, cfg.data.label_size)
    prep = Preprocessor(sizes=sizes, tokenizer=load_tokenizer(cfg.model))
    rows = train_rows(Path(cfg.data.path), cfg.data.train_split, cfg.data.limit)
    if kind == "deepspeed":
        engine, _, _ = build_engine(model, train, world_size=world, steps_per_epoch=steps_per_epoch)
        step = lambda inputs: train_step(engine, inputs)  # noqa: E731
    else:
        net = torch.nn.parallel.DistributedDataParallel(model) if kind == "ddp" else model
        step = eager_step(model, net, train, build_optimizer([p for p in model.parameters() if p.requires_grad], train))
    micro = train.batch_size // world
    dist.barrier()
    t0 = time.perf_counter()
    # The same global batches on every rank (one seed); each takes its slice.
    for picked in global_batches(len(rows), train.batch_size, steps, train.seed):
        batch = prep(pa.Table.from_pylist([rows[i] for i in picked[rank * micro:(rank + 1) * micro]]))
        step(model_batch(batch, sizes, "cpu", augment=cfg.data.augment))
    dist.barrier()
    if rank == 0:
        out.put(time.perf_counter() - t0)
    dist.destroy_process_group()


def engines(cfg, steps: int, steps_per_epoch: int) -> dict[str, float]:
    """Wall seconds of `steps` steps per way of exchanging gradients (see `engine_loop`)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    seconds = {}
    for kind in ENGINES:
        with socket.socket() as sock:  # a free port for this group's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = ctx.Queue()
        mp.spawn(engine_loop, args=(cfg.train.num_workers, kind, cfg.to_dict(), steps, steps_per_epoch, port, out),
                 nprocs=cfg.train.num_workers)
        seconds[kind] = out.get()
        print(f"{kind}: {seconds[kind]:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    parser.add_argument("--size", type=int, default=0, help="synthetic triplets (default: the demo's)")
    parser.add_argument("--data", help="a prepared dataset to use instead of a fresh synthetic one")
    parser.add_argument("--work-dir", help="where the data, runs and MLflow store go (default: a temp dir)")
    parser.add_argument("--engines", action="store_true",
                        help="also step in train.num_workers processes without Ray: no exchange, DDP, DeepSpeed")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from rsrefseg.jobs.demo import DEFAULT_SIZE
    from rsrefseg.jobs.train import run_train, steps_per_epoch
    from rsrefseg.platform.config import load_config

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rsrefseg-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["RSREFSEG_HOME"] = str(work)
    data = Path(args.data) if args.data else prepared_dataset(work, args.size or DEFAULT_SIZE, seed=0)
    cfg = load_config(args.config, [f"data.path={data}", f"train.storage_path={work / 'runs'}",
                                    f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.run_name=overhead",
                                    *args.overrides])
    rows = train_rows(data, cfg.data.train_split, cfg.data.limit)
    per_epoch = steps_per_epoch(cfg, len(rows))
    steps = per_epoch * cfg.train.epochs
    print(f"{len(rows)} training rows, {per_epoch} steps/epoch x {cfg.train.epochs} epochs = {steps} steps "
          f"of global batch {cfg.train.batch_size}", flush=True)

    plain_s = plain_loop(cfg.resolved(), rows, steps, per_epoch)
    print(f"plain loop: {plain_s:.1f} s", flush=True)
    by_engine = engines(cfg.resolved(), steps, per_epoch) if args.engines else {}
    t0 = time.perf_counter()
    outcome = run_train(cfg)
    platform_s = time.perf_counter() - t0
    epochs = breakdown(cfg, outcome.mlflow_run_id)

    print(f"\n# platform overhead: {Path(args.config).name}, {steps} steps "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
          f"torch {torch.__version__}, {datetime.date.today().isoformat()})")
    print("| path | wall s | s/step | vs plain |")
    print("|---|---|---|---|")
    print(f"| plain PyTorch loop (1 process) | {plain_s:.1f} | {plain_s / steps:.3f} | 1.00x |")
    workers = cfg.train.num_workers
    labels = {"independent": "no gradient exchange", "ddp": "torch DDP (gloo)", "deepspeed": "DeepSpeed ZeRO-2 engine"}
    for kind, seconds in by_engine.items():
        print(f"| {workers} processes, no Ray: {labels[kind]} | {seconds:.1f} | {seconds / steps:.3f} "
              f"| {seconds / plain_s:.2f}x |")
    print(f"| rsrefseg train (Ray Train, {workers} workers, DeepSpeed ZeRO-2, val + checkpoint per epoch, MLflow) "
          f"| {platform_s:.1f} | {platform_s / steps:.3f} | {platform_s / plain_s:.2f}x |")
    if epochs:
        print(f"\nplatform, per epoch (from its MLflow metrics): {epochs}")
    print(f"\noverhead: {platform_s / plain_s:.2f}x the plain loop for the same {steps} steps", flush=True)


def breakdown(cfg, run_id: str | None) -> str:
    """Training-step time vs. the rest, per epoch, from the run's logged throughput."""
    if not run_id:
        return ""
    from rsrefseg.platform import paths, tracking

    client = tracking.client(paths.with_tracking_store(cfg).tracking)
    run = client.get_run(run_id)
    start = run.info.start_time / 1000
    epochs = sorted(client.get_metric_history(run_id, "val/gIoU"), key=lambda m: m.step)
    if not epochs:
        return ""
    first = epochs[0].timestamp / 1000 - start
    last = (epochs[-1].timestamp - epochs[0].timestamp) / 1000 / max(1, len(epochs) - 1)
    return (f"run start to first epoch logged {first:.1f} s (worker start-up, model build, DeepSpeed init, "
            f"epoch 1); then {last:.1f} s per epoch")


if __name__ == "__main__":
    sys.exit(main())
