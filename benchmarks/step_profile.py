"""Where a training step's time goes: `torch.profiler` over a few steps, read for the three
questions that decide what to optimise next.

  * GPU busy share: kernel time over wall time. Far below 100 % means the GPU waits on the
    host (launch overhead, Python, syncs), and fusing or compiling helps more than faster kernels.
  * Kernel classes (matmul, attention, conv, normalization, elementwise, copies, ...) and the top
    kernels by device time: which kind of work dominates once the GPU is busy.
  * Host-device syncs per step, each with the source line that caused it
    (`torch.cuda.set_sync_debug_mode`): every one stalls the launch queue.

Used by `train_step.py --profile DIR`; the Chrome trace (`chrome://tracing`, Perfetto) lands in DIR.
"""

from __future__ import annotations

import collections
import gzip
import shutil
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Kernel name fragments, checked in order (attention before matmul: fused attention kernels are
# built from GEMM pieces and some carry "gemm" in their names).
KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "mem_eff")),
    ("conv", ("conv", "fprop", "dgrad", "wgrad")),
    ("matmul", ("gemm", "nvjet", "xmma", "cublas", "cutlass", "splitk")),
    ("triton (fused)", ("triton",)),
    ("optimizer", ("adam", "multi_tensor")),
    ("normalization", ("layer_norm", "layernorm", "batch_norm", "norm_")),
    ("softmax", ("softmax",)),
    ("copy / layout", ("copy", "memcpy", "memset", "cat_", "transpose", "permute", "index", "pad")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
SCALAR_READS = ("aten::_local_scalar_dense",)


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, fragments in KERNEL_CLASSES:
        if any(f in low for f in fragments):
            return label
    return "other"


def device_time_us(event) -> float:
    # `self_device_time_total` since torch 2.4; `self_cuda_time_total` before.
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0))


def sync_sources(step, inputs: dict, device: torch.device) -> collections.Counter:
    """Source lines of the synchronizing CUDA calls of one step (empty on CPU)."""
    if device.type != "cuda":
        return collections.Counter()
    here = Path(__file__).resolve()
    sources: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        # The innermost frame outside this file, the warnings machinery and torch names the caller.
        frames = [f for f in traceback.extract_stack()[:-1]
                  if Path(f.filename).resolve() != here and Path(f.filename).name != "warnings.py"]
        where = next((f for f in reversed(frames) if "/torch/" not in f.filename), frames[-1])
        sources[f"{where.filename}:{where.lineno} ({where.name})"] += 1

    show = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(inputs)
            torch.cuda.synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = show
    return sources


def profile_step(step, inputs: dict, device: torch.device, out_dir: Path, warmup: int = 3, active: int = 3) -> dict:
    """Profile `active` steps after `warmup`; print the breakdown; write the trace to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(warmup):
        step(inputs)
    sources = sync_sources(step, inputs, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(active):
            step(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = 1000 * (time.perf_counter() - t0) / active

    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    by_class: collections.Counter = collections.Counter()
    for k in kernels:
        by_class[kernel_class(k.key)] += device_time_us(k) / 1000 / active
    busy_ms = sum(by_class.values())
    cpu_events = {e.key: e.count for e in prof.key_averages() if e.device_type == DeviceType.CPU}
    syncs = {name: cpu_events.get(name, 0) / active for name in SYNC_EVENTS + SCALAR_READS if cpu_events.get(name)}

    print(f"step wall time {wall_ms:.1f} ms; GPU kernel time {busy_ms:.1f} ms "
          f"({100 * busy_ms / wall_ms:.0f} % busy)" if device.type == "cuda" else f"step wall time {wall_ms:.1f} ms")
    if kernels:
        print("\n| kernel class | ms/step | share of kernel time |\n|---|---|---|")
        for label, ms in by_class.most_common():
            print(f"| {label} | {ms:.1f} | {100 * ms / busy_ms:.1f}% |")
        print("\n| top kernels | class | calls/step | ms/step |\n|---|---|---|---|")
        for k in sorted(kernels, key=device_time_us, reverse=True)[:15]:
            print(f"| {k.key[:100]} | {kernel_class(k.key)} | {k.count / active:.0f} | {device_time_us(k) / 1000 / active:.2f} |")
    print("\nhost-device syncs per step (profiler):", syncs or "none")
    if sources:
        print("synchronizing calls in one step, by source line:")
        for where, n in sources.most_common():
            print(f"  {n:4d}  {where}")
    elif device.type == "cuda":
        print("synchronizing calls in one step: none")

    trace = out_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(out_dir / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    print(f"trace: {out_dir / 'trace.json.gz'}")
    return {"wall_ms": wall_ms, "kernel_ms": busy_ms, "by_class": dict(by_class), "syncs": syncs,
            "sync_sources": dict(sources)}
