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
    python benchmarks/train_step.py --preset rsrefseg2-l --batch 1 --steps 1 --warmup 0  # RSRefSeg-2, CPU
    python benchmarks/train_step.py --preset rsrefseg-b --batch 0 # GPU: largest batch that fits
    python benchmarks/train_step.py --preset rsrefseg-b --batch 0 --set model.activation_checkpointing=true
    python benchmarks/train_step.py --preset rsrefseg-b --batch 0 \
        --variant model.activation_checkpointing=true \
        --variant model.compile_backbones=true,model.channels_last=true

`--batch 0` doubles the batch from 1 until a step runs out of memory (GPU only) and keeps the
largest that fit, for each row separately, on one engine per row (rebuilt once after the OOM).
Rows that compile the towers (`model.compile_backbones`, on by default on GPU) take the largest
batch found for the rows that do not, instead of searching: each new batch size would recompile
the towers (minutes), and Inductor's fusions only lower memory. Rows that do not compile run
first; the table keeps the order given. With no such row, compiled rows search too. Each `--variant` adds one DeepSpeed row, so switches are compared side by side
in one run. Figures name the device they were measured on.

`--profile DIR` runs the fastest DeepSpeed row once more under `torch.profiler` and prints where a
step's GPU time goes (kernel classes, top kernels), how busy the GPU is, and every host-device
sync in a step with the source line that caused it; the trace goes to DIR (gzipped Chrome trace).
`--json FILE` writes the rows and the run's facts (device, date, versions) for the README table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rsrefseg.training.engine import build_engine, train_step
from rsrefseg.inference.scoring import model_inputs
from rsrefseg.models.presets import get_preset
from rsrefseg.models.build import build_model
from rsrefseg.platform.config import Config
from rsrefseg.platform.errors import ConfigError


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


# The reference point: segment-anything's own attention, nothing compiled, NCHW.
EAGER = ["model.sdpa_attention=false", "model.compile_backbones=false", "model.channels_last=false"]


def arch_of(preset: str, arch: str = "") -> str:
    """The architecture of a preset name (`tiny` exists for both: `arch`, default rsrefseg)."""
    return "rsrefseg2" if preset.startswith("rsrefseg2-") else arch or "rsrefseg"


def model_config(preset: str, rank: int, overrides: list[str] = (), arch: str = "") -> Config:
    # The paper's trainable set with LoRA rank `rank` on every tuned component.
    return Config().replace([
        f"model.arch={arch_of(preset, arch)}", f"model.preset={preset}", f"model.lora.sam_rank={rank}",
        f"model.lora.siglip_vision_rank={rank}", f"model.lora.siglip_text_rank={rank}", *overrides,
    ])


def step_loss(model, batch: dict) -> torch.Tensor:
    """The loss of a training step, every term of the architecture's (as `engine.train_step`)."""
    logits, aux = model(**model_inputs(batch), return_aux=True)
    return sum(model.loss_terms(logits.float(), batch["mask"], aux).values())


def count_flops(model, batch: dict) -> float:
    """FLOPs of one forward + backward, per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step_loss(model, batch).backward()
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


def build_on(device: torch.device, cfg: Config):
    """The random-initialised model, drawn directly on `device` (a CPU draw of SigLIP-so400m's
    weights takes tens of seconds, and the search builds each row up to twice), with the `auto`
    switches decided for that device as the train job decides them."""
    with torch.device(device):
        return build_model(cfg.model, random_init=True, gpu=device.type == "cuda").to(device)


def eager_path(cfg: Config, device: torch.device):
    model = build_on(device, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        step_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def engine_train_config(cfg: Config, device: torch.device, batch: int):
    """The train section a one-process benchmark engine runs (validated: a bad --batch or --set
    fails here, before any work)."""
    return cfg.replace({"train.batch_size": batch, "train.num_workers": 1,
                        "train.use_gpu": device.type == "cuda"}).resolved().train


def deepspeed_path(cfg: Config, device: torch.device, batch: int):
    """What a train worker runs: the train job's engine (build_engine) and step (train_step)."""
    precision = "bf16" if device.type == "cuda" else "fp32"
    engine, _, _ = build_engine(build_on(device, cfg), engine_train_config(cfg, device, batch), world_size=1,
                                steps_per_epoch=10**6, precision=precision)

    def step(b):
        train_step(engine, b)

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


def free_cuda() -> None:
    gc.collect()  # DeepSpeed engines hold reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(step, inputs_for, device: torch.device, cap: int = 256) -> tuple[int, bool]:
    """Double the batch from 1 on one model until a step runs out of GPU memory.

    Returns (largest batch that ran, whether an OOM hit the model): after an OOM inside a
    DeepSpeed step its gradient buckets may be half-filled, so the caller builds a fresh one."""
    best, b = 0, 1
    while b <= cap:
        try:
            inputs = inputs_for(b)
            step(inputs)
            step(inputs)
            sync(device)
            best = b
            b *= 2
        except torch.cuda.OutOfMemoryError:
            return best, True
        finally:
            inputs = None
            free_cuda()
    return best, False


def measure(name: str, step, inputs: dict, device: torch.device, args, flops: float, peak_tflops: float) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch = inputs["mask"].shape[0]
    seconds = time_steps(step, inputs, device, args.warmup, args.steps)
    achieved = flops * batch / seconds / 1e12
    return {
        "path": name, "batch": batch, "samples_per_s": batch / seconds, "ms_per_step": 1000 * seconds,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "tflops": achieved, "mfu": achieved / peak_tflops,
    }


def row_name(precision: str, overrides: list[str]) -> str:
    """A DeepSpeed row: the train job's defaults, plus the overrides that differ."""
    return " ".join([f"deepspeed-zero2-{precision}", *overrides])


def table_line(r: dict) -> str:
    mem = "-" if r["peak_mem_gib"] is None else format(r["peak_mem_gib"], ".1f")
    ratio = "" if "vs_first" not in r else f" {r['vs_first']:.2f}x |"
    return (f"| {r['path']} | {r['batch']} | {r['samples_per_s']:.2f} | {r['ms_per_step']:.1f} | {mem} | "
            f"{r['tflops']:.3f} | {100 * r['mfu']:.1f}% |{ratio}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "rsrefseg-b", "rsrefseg-l", "rsrefseg2-t",
                                                               "rsrefseg2-s", "rsrefseg2-b+", "rsrefseg2-l"])
    parser.add_argument("--arch", default="", choices=["", "rsrefseg", "rsrefseg2"],
                        help="the architecture of `--preset tiny` (a real preset's name says its own)")
    parser.add_argument("--batch", type=int, default=8, help="per-step batch; 0 = largest that fits (GPU)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every DeepSpeed row, e.g. model.activation_checkpointing=true")
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="one more DeepSpeed row with these overrides on top of --set, "
                             "e.g. model.compile_backbones=true,model.channels_last=true")
    parser.add_argument("--no-eager", action="store_true",
                        help="skip the eager-fp32 row (ratios are then to the first DeepSpeed row)")
    parser.add_argument("--profile", metavar="DIR", help="profile the fastest DeepSpeed row; trace into DIR")
    parser.add_argument("--json", metavar="FILE", help="write the rows and the run's facts as JSON")
    return parser.parse_args()


def row_configs(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """Every DeepSpeed row's overrides (--set, then one per --variant), checked before any work
    (building models, counting FLOPs)."""
    if args.batch == 0 and device.type != "cuda":
        raise SystemExit("--batch 0 searches GPU memory; give a batch on CPU")
    configs = [[*args.overrides, *(v for v in variant.split(",") if v)] for variant in ["", *args.variants]]
    try:
        for overrides in configs:
            engine_train_config(model_config(args.preset, args.lora_rank, arch=args.arch, overrides=overrides),
                                device, max(args.batch, 1))
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    return configs


@dataclass
class Bench:
    """What every row is measured with: the run's flags, the device, the model FLOPs per sample
    and the device's measured matmul rate."""

    args: argparse.Namespace
    device: torch.device
    flops: float
    peak: float


def eager_builder(cfg: Config, device: torch.device):
    """Builds the eager-fp32 row: its step and a maker of device batches of a given size."""

    def build():
        model, step = eager_path(cfg, device)
        return step, lambda b: to(make_batch(model, b), device)

    return build


def deepspeed_builder(bench: Bench, overrides: list[str]):
    """Builds one DeepSpeed row: its step and a maker of device batches of a given size."""
    args, device = bench.args, bench.device
    cfg = model_config(args.preset, args.lora_rank, arch=args.arch, overrides=overrides)

    def build():
        engine, step, _ = deepspeed_path(cfg, device, max(args.batch, 1))
        return step, lambda b: to(make_batch(engine.module, b), device)

    return build


def model_flops(eager_cfg: Config, device: torch.device, batch: int) -> float:
    """FLOPs per sample, counted on the plain eager model: the optimizations change how, not
    what, is computed."""
    model, _ = eager_path(eager_cfg, device)
    flops = count_flops(model, to(make_batch(model, min(batch or 2, 2)), device))
    del model
    free_cuda()
    return flops


def run_facts(args: argparse.Namespace, device: torch.device, peak: float, peak_dtype: str, flops: float) -> dict:
    return {
        "preset": args.preset, "lora_rank": args.lora_rank, "device": device_name(device),
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "matmul_tflops": peak, "matmul_dtype": peak_dtype, "gflop_per_sample": flops / 1e9,
    }


def run_row(bench: Bench, name: str, build, search: bool, found: list[int]) -> dict:
    """Builds one row, finds its batch (searched, or the largest `found` so far), measures it and
    prints its line as it finishes."""
    args, device = bench.args, bench.device
    t0 = time.perf_counter()
    step, inputs_for = build()
    batch = args.batch
    if not batch and search:
        batch, broken = largest_batch(step, inputs_for, device)
        if broken:  # the OOM may have left the engine's buckets half-filled
            step = inputs_for = None
            free_cuda()
            step, inputs_for = build()
    elif not batch:
        batch = max(found)
    result = measure(name, step, inputs_for(batch), device, args, bench.flops, bench.peak)
    result["wall_s"] = time.perf_counter() - t0
    print(f"{table_line(result)}  ({result['wall_s']:.0f} s with build and search)", flush=True)
    step = inputs_for = None
    free_cuda()
    return result


def run_rows(bench: Bench, configs: list[list[str]], precision: str, eager_cfg: Config):
    """Every row (eager-fp32 unless --no-eager, then the DeepSpeed rows, uncompiled ones first),
    in the order given, each with its speed-up over the first; and the DeepSpeed rows with
    their overrides."""
    args = bench.args
    found: list[int] = []  # batches the search found for DeepSpeed rows, in row order
    rows = [] if args.no_eager else [run_row(bench, "eager-fp32", eager_builder(eager_cfg, bench.device), True, found)]
    gpu = bench.device.type == "cuda"
    compiles = [bool(model_config(args.preset, args.lora_rank, arch=args.arch, overrides=o).model.on_device(gpu)
                     .compile_backbones) for o in configs]
    measured: dict[int, dict] = {}
    for i in sorted(range(len(configs)), key=lambda i: compiles[i]):  # uncompiled rows first
        search = not compiles[i] or not found
        measured[i] = run_row(bench, row_name(precision, configs[i]), deepspeed_builder(bench, configs[i]), search, found)
        if not compiles[i]:
            found.append(measured[i]["batch"])
    ds_rows = [(configs[i], measured[i]) for i in range(len(configs))]
    rows += [r for _, r in ds_rows]
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["vs_first"] = r["samples_per_s"] / base
    return rows, ds_rows


def print_report(args: argparse.Namespace, preset, facts: dict, rows: list[dict]) -> None:
    peak, peak_dtype, gflop = facts["matmul_tflops"], facts["matmul_dtype"], facts["gflop_per_sample"]
    print(f"\n# train step: {args.preset} (SAM {preset.sam.img_size}px, SigLIP {preset.siglip.image_size}px), "
          f"LoRA r={args.lora_rank}")
    print(f"device: {facts['device']}; torch {facts['torch']}; {facts['date']}")
    print(f"measured matmul rate ({peak_dtype}): {peak:.2f} TFLOP/s; model FLOPs/sample (fwd+bwd): {gflop:.2f} GFLOP")
    print("DeepSpeed rows run the train job's defaults for this device plus their overrides\n")
    print(f"| path | batch | samples/s | ms/step | peak GPU mem (GiB) | TFLOP/s | MFU | vs {rows[0]['path']} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(table_line(r), flush=True)


def profile_fastest(bench: Bench, ds_rows: list[tuple[list[str], dict]]) -> None:
    """Runs the fastest DeepSpeed row once more under the profiler; trace into --profile."""
    from step_profile import profile_step

    overrides, best = max(ds_rows, key=lambda item: item[1]["samples_per_s"])
    step, inputs_for = deepspeed_builder(bench, overrides)()
    print(f"\n# profile: {best['path']} at batch {best['batch']}")
    profile_step(step, inputs_for(best["batch"]), bench.device, Path(bench.args.profile), warmup=bench.args.warmup)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = row_configs(args, device)
    torch.manual_seed(0)
    init_process_group(device)
    peak, peak_dtype = matmul_tflops(device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    eager_cfg = model_config(args.preset, args.lora_rank, arch=args.arch, overrides=EAGER)
    flops = model_flops(eager_cfg, device, args.batch)

    preset = get_preset(args.preset, arch_of(args.preset, args.arch))
    facts = run_facts(args, device, peak, peak_dtype, flops)
    print(f"{facts['device']}: matmul {peak:.1f} TFLOP/s ({peak_dtype}); {flops / 1e9:.1f} GFLOP/sample; "
          "rows as they finish (path | batch | samples/s | ms/step | GiB | TFLOP/s | MFU):", flush=True)
    bench = Bench(args, device, flops, peak)
    rows, ds_rows = run_rows(bench, configs, precision, eager_cfg)

    print_report(args, preset, facts, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({**facts, "rows": rows}, indent=1))
    if args.profile:
        profile_fastest(bench, ds_rows)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
