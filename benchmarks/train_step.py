"""Training-step benchmark: the platform's DeepSpeed ZeRO-2 step against plain eager fp32, one run.

For one preset (random-initialised at its real sizes: no weights are needed to measure speed) it
reports, side by side and on the device it finds (CUDA if present, else CPU):

  * the device's measured matmul rate (a large bf16 matmul on GPU, fp32 on CPU), the MFU yardstick;
  * model FLOPs per sample of one training step (forward + backward), counted with
    `torch.utils.flop_counter.FlopCounterMode`;
  * `eager-fp32`: the reference point, no optimizations (segment-anything's own attention, fp32,
    a plain `torch.optim.AdamW` loop);
  * `deepspeed`: what a train worker runs: `deepspeed.initialize` with the train job's own ZeRO-2
    config (bf16 on GPU, fp32 on CPU), SDPA attention, the train job's fused AdamW;
  * per path: batch, samples/s, ms/step, peak GPU memory, achieved TFLOP/s, MFU, and the
    speed-up over eager-fp32.

    python benchmarks/train_step.py                               # tiny, on whatever device is here
    python benchmarks/train_step.py --preset rsrefseg-b --batch 0 # GPU: largest batch that fits
    python benchmarks/train_step.py --preset rsrefseg-b --batch 0 --set model.activation_checkpointing=true
    python benchmarks/train_step.py --preset rsrefseg-b --batch 0 \
        --variant model.activation_checkpointing=true \
        --variant model.compile_backbones=true,model.channels_last=true

`--batch 0` doubles the batch from 1 until a step runs out of memory (GPU only) and keeps the
largest that fit, for each row separately. Each `--variant` adds one DeepSpeed row, so switches
are compared side by side in one run. Figures name the device they were measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import socket
import time

import torch
import torch.distributed as dist

from rsrefseg.jobs.train_loop import build_optimizer, deepspeed_config
from rsrefseg.models.presets import get_preset
from rsrefseg.models.rsrefseg import build_model
from rsrefseg.platform.config import Config


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def matmul_tflops(device: torch.device) -> tuple[float, str]:
    """Measured dense matmul rate: the MFU denominator, taken on this device in this run."""
    dtype, n, reps = (torch.bfloat16, 8192, 50) if device.type == "cuda" else (torch.float32, 1024, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, str(dtype).replace("torch.", "")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(model, batch: int) -> dict[str, torch.Tensor]:
    s = model.sizes
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (batch, s.max_text_len), generator=g)
    return {
        "sam_image": torch.randint(0, 256, (batch, 3, s.sam_image, s.sam_image), dtype=torch.uint8, generator=g),
        "siglip_image": torch.randint(0, 256, (batch, 3, s.siglip_image, s.siglip_image), dtype=torch.uint8, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mask": (torch.rand(batch, s.label, s.label, generator=g) > 0.7).to(torch.uint8),
    }


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_config(preset: str, rank: int, sdpa: bool, overrides: list[str] = ()) -> Config:
    # The paper's trainable set with LoRA rank `rank` on every tuned component.
    return Config().replace([
        f"model.preset={preset}", f"model.lora.sam_rank={rank}", f"model.lora.siglip_vision_rank={rank}",
        f"model.lora.siglip_text_rank={rank}", f"model.sdpa_attention={str(sdpa).lower()}", *overrides,
    ])


def step_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("sam_image", "siglip_image", "input_ids", "attention_mask")}


def count_flops(model, batch: dict) -> float:
    """FLOPs of one forward + backward, per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = model.loss(model(**step_inputs(batch)).float(), batch["mask"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["mask"].shape[0]


def time_steps(step, batch: dict, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step, after `warmup` untimed steps; the inputs are already on the device."""
    for _ in range(warmup):
        step(batch)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(batch)
    sync(device)
    return (time.perf_counter() - t0) / steps


def eager_path(cfg: Config, device: torch.device):
    model = build_model(cfg.model, random_init=True).to(device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        loss = model.loss(model(**step_inputs(batch)).float(), batch["mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def deepspeed_path(cfg: Config, device: torch.device, batch: int):
    import deepspeed

    precision = "bf16" if device.type == "cuda" else "fp32"
    model = build_model(cfg.model, random_init=True)
    train = cfg.replace({"train.batch_size": batch, "train.use_gpu": device.type == "cuda"}).train
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], train)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(train, 1, precision),
                                      dist_init_required=False)

    def step(b):
        logits = engine(**step_inputs(b))
        loss = engine.module.loss(logits.float(), b["mask"])
        engine.backward(loss)
        engine.step()

    return engine, step, precision


def init_process_group(device: torch.device) -> None:
    """A one-process group, as Ray Train sets up for a worker (DeepSpeed needs one)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def largest_batch(make_step, device: torch.device, start: int = 1, cap: int = 256) -> int:
    """Double the batch until a step runs out of GPU memory; the largest that ran."""
    best, b = 0, start
    while b <= cap:
        try:
            step, batch = make_step(b)
            step(batch)
            step(batch)
            sync(device)
            best = b
            b *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            step = batch = None
            torch.cuda.empty_cache()
    return best


def measure(name: str, build, device: torch.device, batch: int, args, flops: float, peak_tflops: float) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, inputs = build(batch)
    seconds = time_steps(step, inputs, device, args.warmup, args.steps)
    achieved = flops * batch / seconds / 1e12
    row = {
        "path": name, "batch": batch, "samples_per_s": batch / seconds, "ms_per_step": 1000 * seconds,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "tflops": achieved, "mfu": achieved / peak_tflops,
    }
    del step, inputs
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "rsrefseg-b", "rsrefseg-l"])
    parser.add_argument("--batch", type=int, default=8, help="per-step batch; 0 = largest that fits (GPU)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every DeepSpeed row, e.g. model.activation_checkpointing=true")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="one more DeepSpeed row with these overrides on top of --set, "
                             "e.g. model.compile_backbones=true,model.channels_last=true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.batch == 0 and device.type != "cuda":
        raise SystemExit("--batch 0 searches GPU memory; give a batch on CPU")
    torch.manual_seed(0)
    init_process_group(device)
    peak, peak_dtype = matmul_tflops(device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    eager_cfg = model_config(args.preset, args.lora_rank, sdpa=False)

    def build_eager(b):
        model, step = eager_path(eager_cfg, device)
        return step, to(make_batch(model, b), device)

    def ds_builder(overrides: list[str]):
        cfg = model_config(args.preset, args.lora_rank, sdpa=True, overrides=overrides)

        def build(b):
            engine, step, _ = deepspeed_path(cfg, device, b)
            return step, to(make_batch(engine.module, b), device)

        return build

    # The plain eager model counts the FLOPs: the optimizations change how, not what, is computed.
    model, _ = eager_path(eager_cfg, device)
    flops = count_flops(model, to(make_batch(model, min(args.batch or 2, 2)), device))
    del model

    def row(name: str, build) -> dict:
        batch = args.batch or largest_batch(build, device)
        return measure(name, build, device, batch, args, flops, peak)

    rows = [row("eager-fp32", build_eager)]
    for extra in [[], *([v for v in variant.split(",") if v] for variant in args.variants)]:
        overrides = [*args.overrides, *extra]
        rows.append(row(" ".join([f"deepspeed-zero2-{precision}+sdpa", *overrides]), ds_builder(overrides)))
    base = rows[0]["samples_per_s"]

    preset = get_preset(args.preset)
    print(f"\n# train step: {args.preset} (SAM {preset.sam.img_size}px, SigLIP {preset.siglip.image_size}px), "
          f"LoRA r={args.lora_rank}")
    print(f"device: {device_name(device)}; torch {torch.__version__}; {datetime.date.today().isoformat()}")
    print(f"measured matmul rate ({peak_dtype}): {peak:.2f} TFLOP/s; model FLOPs/sample (fwd+bwd): {flops / 1e9:.2f} GFLOP\n")
    print("| path | batch | samples/s | ms/step | peak GPU mem (GiB) | TFLOP/s | MFU | vs eager-fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['batch']} | {r['samples_per_s']:.2f} | {r['ms_per_step']:.1f} | "
              f"{'-' if r['peak_mem_gib'] is None else format(r['peak_mem_gib'], '.1f')} | {r['tflops']:.3f} | {100 * r['mfu']:.1f}% | {r['samples_per_s'] / base:.2f}x |")
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
