"""Resumable prepare: a full prepare, then one killed at about 60 % of that time and its rerun.

Writes N synthetic samples in the RRSIS-D layout as the dataset ships (RMSIN's README:
`rrsisd/refs(unc).p`, `rrsisd/instances.json` with `categories_id` and a list around one
compressed RLE per annotation, `images/rrsisd/JPEGImages/*.jpg`), one image per ref, split
70/10/20. Then, each `rsrefseg prepare` in a process of its own (as a user runs it):

  1. a full prepare into `full/` (timed);
  2. a prepare into `resumed/`, SIGKILLed at --kill-at (default 0.6) of the full prepare's time;
  3. the same prepare into `resumed/` again (timed): it keeps the shards the killed one finished
     (checked against their recorded hashes) and its validation, and does the rest.

Prints the three times (wall and the prepare process's CPU seconds: on a shared machine the CPU
ratio is the steadier one), what the kill left, the shards the rerun kept, the ratios rerun /
full, and whether both published the same content hash (they must).

    python benchmarks/prepare_resume.py                    # N=2000, 256 px
    python benchmarks/prepare_resume.py --n 4000 --side 800
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = (
    "Expressway-Service-area Expressway-toll-station airplane airport baseballfield basketballcourt bridge chimney dam "
    "golffield groundtrackfield harbor overpass ship stadium storagetank tenniscourt trainstation vehicle windmill"
).split()
WORDS = "the white red small large vehicle ship bridge tank on left right top bottom of near middle".split()


def photograph(rng: np.random.Generator, side: int) -> np.ndarray:
    """Something like an aerial photograph: smooth fields of colour, fine texture on top."""
    coarse = rng.normal(128, 40, (side // 32 + 2, side // 32 + 2, 3)).clip(0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.float32)
    return (smooth + rng.normal(0, 6, (side, side, 1))).clip(0, 255).astype(np.uint8)


def make_rrsisd(root: Path, n: int, side: int, seed: int = 0) -> None:
    """N refs over N images in the RRSIS-D layout as downloaded."""
    rng = np.random.default_rng(seed)
    meta, images_dir = root / "rrsisd", root / "images" / "rrsisd" / "JPEGImages"
    meta.mkdir(parents=True)
    images_dir.mkdir(parents=True)
    images, annotations, refs = [], [], []
    for i in range(1, n + 1):
        name = f"{i:05d}.jpg"
        Image.fromarray(photograph(rng, side)).save(images_dir / name, quality=90)
        mask = np.zeros((side, side), np.uint8)
        y, x = rng.integers(0, side // 2, 2)
        mask[y : y + side // 3, x : x + side // 4] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        category = int(rng.integers(0, len(CATEGORIES)))
        annotations.append({"bbox": [int(x), int(y), side // 4, side // 3], "categories_id": category, "id": i,
                            "image_id": i, "area": int(mask.sum()),
                            "segmentation": [{"size": [side, side], "counts": rle["counts"].decode("ascii")}]})
        images.append({"file_name": name, "height": side, "width": side, "id": i})
        tokens = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(3, 8)))]
        split = "train" if i % 10 < 7 else "val" if i % 10 == 7 else "test"
        refs.append({"image_id": i, "split": split, "file_name": name, "category_id": category, "ann_id": i,
                     "sent_ids": [i], "ref_id": i,
                     "sentences": [{"tokens": tokens, "raw": " ".join(tokens), "sent_id": i, "sent": " ".join(tokens)}]})
    with (meta / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    categories = [{"id": k, "name": name} for k, name in enumerate(CATEGORIES)]
    (meta / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def command(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rsrefseg", "prepare", "--format", "rrsisd", "--root", str(root), "--out", str(out)]


@dataclass
class Run:
    wall: float  # seconds
    cpu: float  # CPU seconds of the prepare's process (user + system): steadier on a shared machine
    output: str


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(root: Path, out: Path, kill_after: float | None = None) -> Run:
    """One prepare (SIGKILLed after `kill_after` seconds, if given): its times and what it printed."""
    start, cpu = time.perf_counter(), cpu_of_children()
    child = subprocess.Popen(command(root, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            output, _ = child.communicate(timeout=kill_after)
            if kill_after is not None:
                raise SystemExit(f"the prepare ended before it was killed:\n{output}")
            if child.returncode:
                raise SystemExit(f"prepare failed ({child.returncode}):\n{output}")
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
        return Run(time.perf_counter() - start, cpu_of_children() - cpu, output)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def journaled(out: Path) -> str:
    """What a killed prepare left: its staging's finished shards (records in its journal)."""
    records = list(out.glob("v-*/.resume/*/part-*.json"))
    return f"{len(records)} finished shard(s) journaled"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="samples (default 2000)")
    parser.add_argument("--side", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--kill-at", type=float, default=0.6, help="share of the full prepare's time (default 0.6)")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        make_rrsisd(work / "RRSIS-D", args.n, args.side)
        print(f"wrote {args.n} RRSIS-D-layout samples ({args.side} px JPEG) in {time.perf_counter() - t0:.1f} s")
        full = run(work / "RRSIS-D", work / "full")
        killed = run(work / "RRSIS-D", work / "resumed", kill_after=args.kill_at * full.wall)
        left = journaled(work / "resumed")
        rerun = run(work / "RRSIS-D", work / "resumed")
        kept = re.search(r"kept \d+ finished shard\(s\) \(\d+ samples\)", rerun.output)
        same = manifest(work / "full")["content_hash"] == manifest(work / "resumed")["content_hash"]
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {date.today()}")
    print("                    wall      CPU")
    print(f"full prepare        {full.wall:6.2f} s  {full.cpu:6.2f} s")
    print(f"killed after        {killed.wall:6.2f} s  {killed.cpu:6.2f} s  ({args.kill_at:.0%} of the full wall time): {left}")
    print(f"rerun (resumed)     {rerun.wall:6.2f} s  {rerun.cpu:6.2f} s  {kept.group(0) if kept else '(kept nothing)'}")
    print(f"rerun / full        {rerun.wall / full.wall:6.2f}    {rerun.cpu / full.cpu:6.2f}")
    print(f"same content hash   {same}")


if __name__ == "__main__":
    main()
