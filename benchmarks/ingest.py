"""Ingest benchmark: the Ray Data pipeline against a plain torch DataLoader, same machine, same run.

Both read the same prepared Parquet shards and do the same per-sample work with the same
functions (PNG decode, resize to the SAM and SigLIP sizes, mask resize, tokenization); the
DataLoader does it per sample in `num_workers` processes, Ray Data per batch in map tasks.
Reported per dataset size: throughput (samples/s, one timed epoch after a warm-up), the
Ray/DataLoader ratio, and the peak memory of the whole process tree (driver, DataLoader workers
or every Ray process; PSS, so shared pages such as Ray's object store count once) sampled during
the epoch. Memory that stays flat from the small size to the large one is the point of streaming.

    python benchmarks/ingest.py                       # sizes 1000 4000, preset tiny
    python benchmarks/ingest.py --sizes 1000 20000 --preset rsrefseg-b

Datasets are built by repeating 64 prepared synthetic samples under new ids, so building even
20k samples takes seconds (~0.15 GB of disk per 1000 samples). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rsrefseg.datasets.pipeline import iter_batches, open_png, preprocess, read_split, resize_image, resize_mask, tokenize
from rsrefseg.datasets.prepare import MANIFEST, ROWS_PER_SHARD, SCHEMA, SCHEMA_VERSION, load_manifest, prepare_dataset
from rsrefseg.datasets.synthetic import generate
from rsrefseg.models.sizes import InputSizes

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


def build_datasets(work: Path, counts: list[int]) -> dict[int, Path]:
    """One prepared dataset ("train" split only) per size, cycling 64 real prepared samples."""
    base = prepare_dataset("synthetic", generate(work / "synthetic", size=64, seed=0), work / "base")
    rows = []
    for shards in base["shards"].values():
        for shard in shards:
            rows.extend(pq.read_table(work / "base" / shard["path"]).to_pylist())
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
            pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), path / name, compression="none", row_group_size=32)
            shards.append({"path": name, "rows": len(chunk)})
        manifest = {"schema_version": SCHEMA_VERSION, "format": "benchmark", "counts": {"train": n}, "shards": {"train": shards}}
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
    time. Each worker keeps the shard it is reading in memory (one at a time)."""

    def __init__(self, path: Path, sizes: InputSizes, tokenizer):
        manifest = load_manifest(path)
        self.files = [path / s["path"] for s in manifest["shards"]["train"]]
        self.starts = list(np.cumsum([0] + [s["rows"] for s in manifest["shards"]["train"]])[:-1])
        self.length = manifest["counts"]["train"]
        self.sizes, self.tokenizer = sizes, tokenizer
        self._shard, self._table = None, None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        shard = bisect.bisect_right(self.starts, i) - 1
        if shard != self._shard:
            self._shard, self._table = shard, pq.read_table(self.files[shard]).to_pylist()
        row = self._table[i - self.starts[shard]]
        image, mask = open_png(row["image"]), open_png(row["mask"])
        ids, attention = tokenize(self.tokenizer, [row["phrase"]], self.sizes.max_text_len)
        return {
            "sam_image": torch.from_numpy(np.ascontiguousarray(resize_image(image, self.sizes.sam_image))),
            "siglip_image": torch.from_numpy(np.ascontiguousarray(resize_image(image, self.sizes.siglip_image))),
            "input_ids": torch.from_numpy(ids[0]),
            "attention_mask": torch.from_numpy(attention[0]),
            "mask": torch.from_numpy(resize_mask(mask, self.sizes.label).copy()),
            "id": row["id"],
            "phrase": row["phrase"],
        }


def run_dataloader(path: Path, sizes, tokenizer, batch_size: int, workers: int) -> tuple[float, int, int]:
    loader = torch.utils.data.DataLoader(ParquetSamples(path, sizes, tokenizer), batch_size=batch_size, num_workers=workers)
    seen = 0
    with PeakMemory() as memory:
        start = time.perf_counter()
        for batch in loader:
            seen += len(batch["id"])
        elapsed = time.perf_counter() - start
    return seen / elapsed, memory.peak, seen, memory.store_peak


def run_ray(path: Path, sizes, tokenizer, batch_size: int) -> tuple[float, int, int]:
    # warm-up: worker processes started and modules imported, as in any epoch after the first
    for _ in iter_batches(preprocess(read_split(path, "train", limit=64), sizes, tokenizer), batch_size):
        pass
    ds = preprocess(read_split(path, "train"), sizes, tokenizer)
    seen = 0
    with PeakMemory() as memory:
        start = time.perf_counter()
        for batch in iter_batches(ds, batch_size):
            seen += len(batch["id"])
        elapsed = time.perf_counter() - start
    return seen / elapsed, memory.peak, seen, memory.store_peak


# --------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000], help="dataset sizes (samples)")
    parser.add_argument("--preset", default="tiny", choices=sorted(FALLBACK_SIZES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (Ray gets as many CPUs)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to build the datasets (default: a temp dir, removed)")
    args = parser.parse_args(argv)

    sizes, tokenizer, tokenizer_name = sizes_and_tokenizer(args.preset)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="rsrefseg-ingest-"))
    try:
        t0 = time.perf_counter()
        datasets = build_datasets(work, args.sizes)
        print(f"built datasets {args.sizes} in {time.perf_counter() - t0:.0f} s under {work}", file=sys.stderr)

        results = {}
        for n, path in datasets.items():  # DataLoader first, before any Ray process exists
            results[n] = {"torch": run_dataloader(path, sizes, tokenizer, args.batch_size, args.workers)}
            print(f"DataLoader n={n}: {results[n]['torch'][0]:.0f} samples/s", file=sys.stderr)

        import ray
        import ray.data

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        idle_ray = PeakMemory.now()
        for n, path in datasets.items():
            results[n]["ray"] = run_ray(path, sizes, tokenizer, args.batch_size)
            print(f"Ray Data n={n}: {results[n]['ray'][0]:.0f} samples/s", file=sys.stderr)
        ray.shutdown()
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    mib = lambda b: f"{b / 2**20:,.0f}"
    print(f"\n### Ingest: Ray Data vs torch DataLoader ({args.preset}: SAM {sizes.sam_image}, SigLIP {sizes.siglip_image}, label {sizes.label}, {sizes.max_text_len} tokens)\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, batch {args.batch_size}, {args.workers} DataLoader workers / Ray CPUs, tokenizer: {tokenizer_name}; Ray processes idle: {mib(idle_ray)} MiB\n")
    print("| samples | DataLoader samples/s | Ray Data samples/s | Ray / DataLoader | DataLoader peak MiB | Ray Data peak MiB | Ray object store peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in results.items():
        (t_rate, t_mem, t_n, _), (r_rate, r_mem, r_n, r_store) = r["torch"], r["ray"]
        assert t_n == r_n == n, (t_n, r_n, n)
        print(f"| {n:,} | {t_rate:,.0f} | {r_rate:,.0f} | {r_rate / t_rate:.2f} | {mib(t_mem)} | {mib(r_mem)} | {r_store:,} |")
    print(
        "\nPeak memory: PSS of the whole process tree during the timed epoch (driver + DataLoader workers,"
        " or driver + every Ray process, object store included); object store: Ray's plasma usage."
    )


if __name__ == "__main__":
    main()
