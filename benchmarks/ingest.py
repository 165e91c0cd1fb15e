"""Ingest benchmark: the Ray Data pipeline against a plain torch DataLoader, same machine, same run.

Both read the same prepared Parquet shards and do the same CPU work with the same function
(`pipeline.Preprocessor`: the raw pixels out of the Parquet buffers, tokenization; images larger
than the SAM input shrunk); the DataLoader per sample in `num_workers` processes, Ray Data per
batch in map tasks. What the model input needs beyond that (resizing to the SAM and SigLIP
sizes, unpacking the mask) runs on the train worker's device (`models.device_inputs`), timed
separately here. Reported per dataset size: throughput (samples/s, one timed epoch after a
warm-up), the Ray/DataLoader ratio, the bytes each sample carries through the object store, and
the peak memory of the whole process tree (driver, DataLoader workers or every Ray process; PSS,
so shared pages such as Ray's object store count once) sampled during a second epoch (sampling
takes CPU from the pipeline, so it stays out of the timed one). Memory that
stays flat from the small size to the large one is the point of streaming.

    python benchmarks/ingest.py                                   # sizes 1000 4000, preset tiny
    python benchmarks/ingest.py --preset rsrefseg-b --sizes 1000 20000 --workers 2
    python benchmarks/ingest.py --preset rsrefseg-b --sizes 512 --encodings raw jpeg   # both shard kinds

Two kinds of shards, side by side in one run (--encodings): "raw", 64 prepared synthetic samples
(512 x 512, RefSegRS's size, raw pixels) repeated under new ids (~0.25 GB of disk per 1000
samples); "jpeg", 64 photograph-like 800 x 800 images (RRSIS-D's size) stored as shipped (JPEG,
quality 90, ~0.2 MB each), which the pipeline decodes on CPU; "jpeg-gpu", the same shards read
with data.decode: gpu (the files travel, and the consumer's `model_batch` decodes them: its cost
is in the device-side line, on this CPU where there is no GPU). Also prints what decoding one
sample costs in each storage format (PNG, the previous one; raw pixels under LZ4 and under ZSTD;
JPEG as shipped) and ends with one summary line per kind.

    python benchmarks/ingest.py --preset rsrefseg-b --sizes 512 --encodings raw jpeg jpeg-gpu
    python benchmarks/ingest.py --preset rsrefseg-b --sizes 2048 --workers 2 --encodings raw jpeg jpeg-reserved

The Ray rows stream as the train workers' streams do, without Ray Data's per-operator
reservations (`pipeline.without_operator_reservations`); "jpeg-reserved" reads the JPEG shards
with them, as every stream did before, side by side.

On a shared machine read "per CPU-second" (samples over the CPU time the pipeline's processes
spent) beside samples/s per core, and the load average the header prints.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rsrefseg.datasets.pipeline import Preprocessor, iter_batches, preprocess, read_split, without_operator_reservations
from rsrefseg.datasets.prepare import MANIFEST, ROWS_PER_SHARD, SCHEMA, SCHEMA_VERSION, load_manifest, prepare_dataset
from rsrefseg.datasets.shard_codec import PIXEL_COMPRESSION, decode_images, image_array
from rsrefseg.datasets.synthetic import generate
from rsrefseg.models.sizes import InputSizes

# Shard kinds (--encodings) -> (the shards they read, the pipeline's `decode`, Ray Data's
# per-operator reservations kept): "jpeg-gpu" reads the JPEG shards with data.decode: gpu (the
# files travel; model_batch decodes them); "jpeg-reserved" streams them with the reservations, as
# every stream did before the train workers' streams dropped them (pipeline.without_operator_reservations).
KINDS = {"raw": ("raw", "cpu", False), "jpeg": ("jpeg", "cpu", False), "jpeg-gpu": ("jpeg", "gpu", False),
         "jpeg-reserved": ("jpeg", "cpu", True)}

FALLBACK_SIZES = {
    "tiny": InputSizes(sam_image=64, siglip_image=64, label=64, max_text_len=16),
    "rsrefseg-b": InputSizes(sam_image=1024, siglip_image=384, label=512, max_text_len=64),
    "rsrefseg-l": InputSizes(sam_image=1024, siglip_image=384, label=512, max_text_len=64),
}


# --------------------------------------------------------------------------------------------
# Inputs


def sizes_and_tokenizer(preset: str):
    """The models package's sizes and tokenizer when it is there; stand-ins otherwise."""
    try:
        from rsrefseg.models.presets import input_sizes
        from rsrefseg.platform.config import ModelConfig

        sizes = input_sizes(ModelConfig(preset=preset))
    except Exception:
        sizes = FALLBACK_SIZES[preset]
    try:
        from rsrefseg.models.tokenizer import load_tokenizer
        from rsrefseg.platform.config import ModelConfig

        return sizes, load_tokenizer(ModelConfig(preset=preset)), "rsrefseg.models.tokenizer"
    except Exception:
        return sizes, fallback_tokenizer(), "word-level stand-in"


def fallback_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rsrefseg.datasets.synthetic import PHRASES

    words = sorted({w for phrase in PHRASES for w in phrase.split()})
    core = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def base_rows(work: Path) -> list[dict]:
    """64 real prepared synthetic samples (every split), as rows of the shards."""
    base = prepare_dataset("synthetic", generate(work / "synthetic", size=64, seed=0), work / "base")
    rows = []
    for shards in base["shards"].values():
        for shard in shards:
            rows.extend(pq.read_table(work / "base" / shard["path"]).to_pylist())
    return rows


def photograph(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Something like an aerial photograph: smooth fields of colour with fine texture on top."""
    from PIL import Image

    coarse = rng.normal(128, 40, (h // 32 + 2, w // 32 + 2, 3)).clip(0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    stripes = 12 * np.sin(xs / 5.0 + 3 * np.sin(ys / 40.0))[..., None]
    return (smooth + stripes + rng.normal(0, 6, (h, w, 1))).clip(0, 255).astype(np.uint8)


def jpeg_rows(rows: list[dict], side: int = 800) -> list[dict]:
    """The base rows with photographs of side x side as JPEG files' bytes (quality 90), their
    masks resized to them (nearest), as prepare stores a JPEG dataset."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for r in rows:
        buffer = io.BytesIO()
        Image.fromarray(photograph(rng, side, side)).save(buffer, format="JPEG", quality=90)
        mask = np.unpackbits(np.frombuffer(r["mask"], np.uint8).reshape(r["height"], -1), axis=1)[:, : r["width"]]
        mask = np.asarray(Image.fromarray(mask.astype(bool)).resize((side, side), Image.NEAREST))
        out.append(dict(r, image=buffer.getvalue(), encoding="jpeg", mask=np.packbits(mask, axis=1).tobytes(), height=side, width=side))
    return out


def build_datasets(work: Path, counts: list[int], rows: list[dict]) -> dict[int, Path]:
    """One prepared dataset ("train" split only) per size, cycling the base rows."""
    out = {}
    for n in counts:
        path = work / f"n{n}"
        (path / "train").mkdir(parents=True, exist_ok=True)
        shards = []
        for start in range(0, n, ROWS_PER_SHARD):
            chunk = []
            for index in range(start, min(n, start + ROWS_PER_SHARD)):
                row = dict(rows[index % len(rows)], id=f"s{index}", split="train", index=index)
                chunk.append(row)
            name = f"train/part-{len(shards):05d}.parquet"
            pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), path / name, compression=PIXEL_COMPRESSION,
                           row_group_size=16)
            shards.append({"path": name, "rows": len(chunk)})
        manifest = {"schema_version": SCHEMA_VERSION, "format": "benchmark", "counts": {"train": n}, "shards": {"train": shards},
                    "largest_image": {"train": [max(r["height"] for r in rows), max(r["width"] for r in rows)]}}
        (path / MANIFEST).write_text(json.dumps(manifest))
        out[n] = path
    return out


# --------------------------------------------------------------------------------------------
# Memory


def object_store_mib() -> int:
    """Ray's object store usage (plasma), MiB; -1 when Ray is not running or does not say."""
    try:
        import ray
        from ray._private.internal_api import memory_summary  # no public API for this figure

        if not ray.is_initialized():
            return -1
        found = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
        return int(found.group(1)) if found else -1
    except Exception:
        return -1


class PeakMemory:
    """Samples the PSS of this process and all its descendants (and Ray's object store usage)
    every `every` seconds."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self.store_peak, self._stop = every, 0, -1, threading.Event()

    @staticmethod
    def now() -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    @staticmethod
    def cpu_s() -> float:
        """CPU seconds (user + system) spent so far by this process and its living descendants
        (Ray's workers live through a run): what an epoch costs whatever else runs on the machine."""
        me = psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def __enter__(self):
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.now())
            self.store_peak = max(self.store_peak, object_store_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


# --------------------------------------------------------------------------------------------
# The two pipelines


class ParquetSamples(torch.utils.data.Dataset):
    """What a hand-written loader would do: index rows of the same shards, one sample at a
    time, through the same `Preprocessor` the Ray pipeline maps. Each worker keeps the shard it
    is reading in memory (one at a time)."""

    def __init__(self, path: Path, sizes: InputSizes, tokenizer, decode: str = "cpu"):
        manifest = load_manifest(path)
        self.files = [path / s["path"] for s in manifest["shards"]["train"]]
        self.starts = list(np.cumsum([0] + [s["rows"] for s in manifest["shards"]["train"]])[:-1])
        self.length = manifest["counts"]["train"]
        self.prep = Preprocessor(sizes=sizes, tokenizer=tokenizer, decode=decode)
        self._shard, self._table = None, None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        shard = bisect.bisect_right(self.starts, i) - 1
        if shard != self._shard:
            self._shard, self._table = shard, pq.read_table(self.files[shard])
        out = self.prep(self._table.slice(i - self.starts[shard], 1))  # a one-row batch, zero-copy
        return {k: (torch.as_tensor(v[0]) if v.dtype != object else v[0]) for k, v in out.items()}


def sample_bytes(batch: dict) -> int:
    """Bytes of one delivered batch: its tensors and its strings (what crossed the object store)."""
    total = 0
    for value in batch.values():
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
        else:
            total += sum(len(v) if isinstance(v, bytes) else len(str(v).encode()) for v in value)
    return total


def timed_epoch(batches) -> dict:
    """Throughput of one epoch with nothing else of the benchmark's running: samples, bytes
    delivered, seconds, and the CPU seconds of this process tree (driver and its workers) spent."""
    seen = nbytes = 0
    cpu, start = PeakMemory.cpu_s(), time.perf_counter()
    for batch in batches:
        seen += len(batch["id"])
        nbytes += sample_bytes(batch)
    elapsed = time.perf_counter() - start
    return {"seen": seen, "nbytes": nbytes, "elapsed": elapsed, "cpu": PeakMemory.cpu_s() - cpu}


def sampled_epoch(batches, total: int) -> dict:
    """Memory over another epoch: the process tree's peak PSS, the object store's peak, and the
    PSS at each tenth of the epoch. Its own epoch, as reading every process's page map takes CPU
    from the pipeline (on 2 cores, JPEG shards, 2026-12-06: 136 samples/s per core with the
    sampling in the timed epoch, 156-160 without, in runs one after the other)."""
    seen, series, every = 0, [], max(1, total // 10)
    with PeakMemory() as memory:
        for batch in batches:
            seen += len(batch["id"])
            if seen >= every * (len(series) + 1):
                series.append((seen, memory.now()))
    return {"peak": memory.peak, "store_peak": memory.store_peak, "series": series}


def run_dataloader(path: Path, sizes, tokenizer, batch_size: int, workers: int, decode: str = "cpu") -> dict:
    def loader():
        samples = ParquetSamples(path, sizes, tokenizer, decode)
        return torch.utils.data.DataLoader(samples, batch_size=batch_size, num_workers=workers)

    timed = timed_epoch(loader())
    return {"rate": timed["seen"] / timed["elapsed"], "peak": sampled_epoch(loader(), timed["seen"])["peak"], "seen": timed["seen"]}


def run_ray(path: Path, sizes, tokenizer, batch_size: int, workers: int, decode: str = "cpu", reserved: bool = False) -> dict:
    def stream(limit: int = 0):
        ds = preprocess(read_split(path, "train", limit=limit), sizes, tokenizer, decode=decode)
        # as the train workers' streams run (training.ingest), unless asked for Ray's default
        return ds if reserved else without_operator_reservations(ds)

    # warm-up: worker processes started and modules imported, as in any epoch after the first
    # (a worker imports the decoders on its first shipped image: ~3 CPU-s for torchvision). Ray
    # Data ramps its task concurrency up, so a shard per Ray CPU is not enough to reach every
    # worker: four are.
    warm = min(len_of(path), 4 * ROWS_PER_SHARD * workers)
    for _ in iter_batches(stream(limit=warm), batch_size):
        pass
    ds = stream()
    timed = timed_epoch(iter_batches(ds, batch_size))
    memory = sampled_epoch(iter_batches(stream(), batch_size), timed["seen"])
    return {"rate": timed["seen"] / timed["elapsed"], "seen": timed["seen"], "bytes_per_sample": timed["nbytes"] / max(timed["seen"], 1),
            "per_cpu_s": timed["seen"] / timed["cpu"], "stats": ds.stats(), **memory}


def one_core_rate(path: Path, sizes, tokenizer, batch_size: int, decode: str = "cpu") -> float:
    """Samples per CPU-second of the read task's work (Parquet read + `Preprocessor`) in this one
    process: what one CPU core delivers, without Ray's scheduling, and (CPU time, not wall time)
    without a busy neighbour's share."""
    files = [path / s["path"] for s in load_manifest(path)["shards"]["train"]]
    prep, seen = Preprocessor(sizes=sizes, tokenizer=tokenizer, decode=decode), 0
    start = time.process_time()
    for name in files:
        table = pq.read_table(name)
        for offset in range(0, len(table), batch_size):
            seen += len(prep(table.slice(offset, batch_size))["id"])
    return seen / (time.process_time() - start)


def len_of(path: Path) -> int:
    return int(load_manifest(path)["counts"]["train"])


def device_side_ms(path: Path, sizes, tokenizer, batch_size: int, decode: str = "cpu") -> tuple[str, float]:
    """Milliseconds per sample of `model_batch` (decode="gpu": decode the JPEGs; resize to SAM and
    SigLIP, unpack and resize the mask) on the GPU when there is one, else on this CPU with every
    thread."""
    from rsrefseg.models.device_inputs import model_batch

    ds = preprocess(read_split(path, "train", limit=batch_size), sizes, tokenizer, decode=decode)
    batch = next(iter_batches(ds, batch_size))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    model_batch(batch, sizes, device, augment=True)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        model_batch(batch, sizes, device, augment=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return name, (time.perf_counter() - start) / reps / len(batch["id"]) * 1000


def jpeg_cost(rows: list[dict], sizes) -> tuple[str, float, float]:
    """(storage, KiB per image, ms to decode one at the pipeline's size) for JPEGs as shipped."""
    rows = list({r["image"]: r for r in rows}.values())
    start = time.perf_counter()
    decode_images([r["image"] for r in rows], ["jpeg"] * len(rows), [(r["height"], r["width"], 3) for r in rows],
                  ["image"] * len(rows), max_side=sizes.sam_image)
    ms = (time.perf_counter() - start) / len(rows) * 1000
    return (f"JPEG as shipped ({rows[0]['width']} x {rows[0]['height']}, q90), decoded for SAM {sizes.sam_image}",
            np.mean([len(r["image"]) for r in rows]) / 1024, ms)


def codec_costs(rows: list[dict]) -> list[tuple[str, float, float]]:
    """(storage, KiB per image on disk, ms to decode one image) for the previous format (PNG,
    Pillow at zlib level 1, as prepare wrote it) and raw pixels under Parquet LZ4 and ZSTD, over
    the same distinct images, one thread."""
    from PIL import Image

    rows = list({r["image"]: r for r in rows}.values())  # distinct images: no dictionary can help
    images = [np.array(image_array(r["image"], r["height"], r["width"])) for r in rows]
    out = []
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        pngs.append(buffer.getvalue())
    start = time.perf_counter()
    for data in pngs:
        with Image.open(io.BytesIO(data)) as im:
            np.asarray(im)
    out.append(("PNG (schema 2)", np.mean([len(d) for d in pngs]) / 1024, (time.perf_counter() - start) / len(pngs) * 1000))
    for codec in ("lz4", "zstd"):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"image": [r["image"] for r in rows]}), buffer, compression=codec, use_dictionary=False)
        data = buffer.getvalue()
        start = time.perf_counter()
        column = pq.read_table(io.BytesIO(data)).column("image")
        for r, value in zip(rows, column):
            image_array(value.as_py(), r["height"], r["width"]).copy()
        out.append((f"raw pixels, Parquet {codec.upper()}", len(data) / len(rows) / 1024, (time.perf_counter() - start) / len(rows) * 1000))
    return out


# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000], help="dataset sizes (samples)")
    parser.add_argument("--preset", default="tiny", choices=sorted(FALLBACK_SIZES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (Ray gets as many CPUs)")
    parser.add_argument("--encodings", nargs="+", default=["raw", "jpeg"], choices=list(KINDS),
                        help="shard kinds: raw 512 x 512 pixels, JPEG 800 x 800 files as shipped (jpeg-gpu: "
                             "the same, decoded by model_batch on the consumer's device, data.decode: gpu; "
                             "jpeg-reserved: decoded on CPU with Ray Data's per-operator reservations kept)")
    parser.add_argument("--stats", action="store_true", help="print Ray Data's stats of each timed epoch")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to build the datasets (default: a temp dir, removed)")
    return parser.parse_args(argv)


@dataclass
class Measurements:
    results: dict  # per (kind, size): {"torch": run_dataloader(...), "ray": run_ray(...)}
    idle_ray: int  # process-tree PSS with Ray started and idle, bytes
    device: str  # where device_side_ms ran
    device_ms: dict  # per kind: ms a sample
    codecs: list[tuple[str, float, float]]
    load: tuple[float, float]  # 1-minute load average before the first timed epoch and after the last


def time_dataloader(datasets: dict[int, Path], sizes, tokenizer, args: argparse.Namespace) -> dict:
    """One DataLoader epoch per size, before any Ray process exists."""
    results = {}
    for key, path in datasets.items():
        decode = KINDS[key[0]][1]
        results[key] = {"torch": run_dataloader(path, sizes, tokenizer, args.batch_size, args.workers, decode),
                        "one_core": one_core_rate(path, sizes, tokenizer, args.batch_size, decode)}
        print(f"DataLoader {key[0]} n={key[1]}: {results[key]['torch']['rate']:.0f} samples/s", file=sys.stderr)
    return results


def time_ray(datasets: dict[int, Path], results: dict, sizes, tokenizer, args: argparse.Namespace) -> tuple[int, str, dict]:
    """Starts Ray, then one Ray Data epoch per size (into `results`) and the device-side cost;
    returns (Ray's idle process-tree memory, device, ms a sample on it per kind)."""
    import ray
    import ray.data

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    idle_ray = PeakMemory.now()
    for key, path in datasets.items():
        _, decode, reserved = KINDS[key[0]]
        results[key]["ray"] = run_ray(path, sizes, tokenizer, args.batch_size, args.workers, decode, reserved)
        print(f"Ray Data {key[0]} n={key[1]}: {results[key]['ray']['rate']:.0f} samples/s", file=sys.stderr)
    device, device_ms = "", {}
    for (kind, n), path in datasets.items():
        if kind not in device_ms:
            device, device_ms[kind] = device_side_ms(path, sizes, tokenizer, args.batch_size, KINDS[kind][1])
    ray.shutdown()
    return idle_ray, device, device_ms


def measure_all(args: argparse.Namespace, sizes, tokenizer) -> Measurements:
    """Builds the datasets (in --work-dir, or a temp dir removed afterwards) and takes every figure."""
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="rsrefseg-ingest-"))
    try:
        t0 = time.perf_counter()
        rows = base_rows(work)
        shards = {KINDS[kind][0] for kind in args.encodings}
        kinds = {"raw": rows, "jpeg": jpeg_rows(rows) if "jpeg" in shards else []}
        built = {name: build_datasets(work / name, args.sizes, kinds[name]) for name in sorted(shards)}
        datasets = {(kind, n): built[KINDS[kind][0]][n] for kind in args.encodings for n in args.sizes}
        print(f"built datasets {args.encodings} x {args.sizes} in {time.perf_counter() - t0:.0f} s under {work}", file=sys.stderr)
        codecs = codec_costs(rows) + ([jpeg_cost(kinds["jpeg"], sizes)] if kinds["jpeg"] else [])
        load = os.getloadavg()[0]
        results = time_dataloader(datasets, sizes, tokenizer, args)
        idle_ray, device, device_ms = time_ray(datasets, results, sizes, tokenizer, args)
        load = (load, os.getloadavg()[0])
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return Measurements(results, idle_ray, device, device_ms, codecs, load)


def mib(b) -> str:
    return f"{b / 2**20:,.0f}"


def print_table(args: argparse.Namespace, sizes, tokenizer_name: str, m: Measurements) -> None:
    """The run's setting and one row per dataset size."""
    print(f"\n### Ingest: Ray Data vs torch DataLoader ({args.preset}: SAM {sizes.sam_image}, SigLIP {sizes.siglip_image}, "
          f"label {sizes.label}, {sizes.max_text_len} tokens; raw: 512 x 512 pixels, jpeg: 800 x 800 files as shipped)\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, batch {args.batch_size}, {args.workers} DataLoader "
          f"workers / Ray CPUs, tokenizer: {tokenizer_name}; Ray processes idle: {mib(m.idle_ray)} MiB; "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {m.load[0]:.1f} before, {m.load[1]:.1f} after\n")
    print("| shards | samples | DataLoader samples/s | Ray Data samples/s | Ray Data per core | Ray Data per CPU-second | 1 process per CPU-second "
          "| Ray / DataLoader | MiB/sample through the store | DataLoader peak MiB | Ray Data peak MiB | Ray object store peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (kind, n), r in m.results.items():
        t, y = r["torch"], r["ray"]
        assert t["seen"] == y["seen"] == n, (t["seen"], y["seen"], n)
        print(f"| {kind} | {n:,} | {t['rate']:,.0f} | {y['rate']:,.0f} | {y['rate'] / args.workers:,.0f} | {y['per_cpu_s']:,.0f} | {r['one_core']:,.0f} "
              f"| {y['rate'] / t['rate']:.2f} "
              f"| {y['bytes_per_sample'] / 2**20:.2f} | {mib(t['peak'])} | {mib(y['peak'])} | {y['store_peak']:,} |")
    print(
        "\nPeak memory: PSS of the whole process tree during a second, untimed epoch (driver + DataLoader workers,"
        " or driver + every Ray process, object store included); object store: Ray's plasma usage. Per CPU-second:"
        " samples over the CPU time (user + system) of the driver and every Ray process during the timed epoch:"
        " what a core delivers when the pipeline has it to itself,"
        " however busy the machine was (samples/s per core is that only on an otherwise idle machine)."
    )


def print_details(args: argparse.Namespace, m: Measurements) -> None:
    """The memory series of the largest size, the device-side cost, the storage formats and the
    summary line."""
    last = m.results[(args.encodings[0], args.sizes[-1])]
    print(f"\nRay Data process-tree memory (PSS, MiB) during the {args.sizes[-1]:,}-sample {args.encodings[0]} epoch, by samples delivered: "
          + ", ".join(f"{n:,}: {mib(b)}" for n, b in last["ray"]["series"]))
    print(f"\nOn the consumer's device ({m.device}): resizing to the model's inputs and unpacking the mask, "
          + ", ".join(f"{kind} {ms:.2f}" for kind, ms in m.device_ms.items())
          + " ms a sample (models.device_inputs.model_batch, flips included; jpeg-gpu: decoding the files too).")
    print("\n| storage of an image (512 x 512 unless said) | KiB on disk | ms to decode (1 thread) |\n|---|---:|---:|")
    for name, kib, ms in m.codecs:
        print(f"| {name} | {kib:,.0f} | {ms:.2f} |")
    for kind in args.encodings:
        last = m.results[(kind, args.sizes[-1])]
        print(f"\ningest ({kind} shards): {last['ray']['rate'] / args.workers:.0f} samples/s per core at {args.preset} sizes "
              f"(Ray Data; {last['ray']['per_cpu_s']:.0f} per CPU-second), {last['one_core']:.0f} per CPU-second in one process; "
              f"Ray Data/DataLoader {last['ray']['rate'] / last['torch']['rate']:.2f}; "
              f"object store {last['ray']['bytes_per_sample'] / 2**20:.2f} MiB/sample")
    if args.stats:
        for (kind, n), r in m.results.items():
            print(f"\nRay Data stats of the timed {kind} epoch, {n:,} samples:\n{r['ray']['stats']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes, tokenizer, tokenizer_name = sizes_and_tokenizer(args.preset)
    measurements = measure_all(args, sizes, tokenizer)
    print_table(args, sizes, tokenizer_name, measurements)
    print_details(args, measurements)


if __name__ == "__main__":
    main()
