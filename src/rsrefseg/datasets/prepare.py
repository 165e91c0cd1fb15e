"""`rsrefseg prepare`: validate a dataset, then write it as Parquet shards with a manifest.

    <out>/manifest.json                                  the published version's shard list
    <out>/v-20250101T120000.123Z-1a2b3c4d/<split>/part-00000.parquet, part-00001.parquet, ...

The manifest lists each shard by its path relative to `<out>` ("v-.../train/part-00000.parquet");
datasets prepared before versions list "train/part-00000.parquet" and load the same way. Every
shard path is checked to lie inside the dataset (`check_shard_path`) before anything reads it.

Validation comes first and covers every sample (a missing or unreadable file, an image that is
not RGB, an image/mask size mismatch, a mask that is not binary, a line without a phrase, a
duplicate id, an id in two splits, a non-UTF-8 line, an empty split). By default any problem
raises one `DatasetError` listing them all and nothing is written; with `skip_invalid` the bad
samples are left out and listed in the manifest, but a split left empty is still an error. A
sample whose format resizes masks (RRSIS-D) is kept with its mask fitted to the image, and listed
in the manifest's warnings. Validation decodes every sample, then writing
decodes it again: more time than one pass, in exchange for never touching the disk when the
input is bad. Both passes decode on local threads, or with `ray_address` as Ray tasks on a
cluster's nodes (`cluster_pool`): the driver reads, orders and writes either way, so the dataset
is the same. Images are stored as shipped (a JPEG or PNG file's own bytes) or raw, masks
bit-packed, under Parquet compression (`shard_codec`).

Publishing is versioned, the same way in a local folder and under an object-store prefix
(`s3://BUCKET/PREFIX`, which has no rename): each prepare writes a new version under its own
prefix `<out>/v-TIME-RANDOM/` (shards streamed straight to the store, no local copy), and the
version becomes the dataset only when `<out>/manifest.json` naming its shards is written (locally
write-then-rename, on a store one PUT, which replaces the object whole). Then, and only then, the
versions it replaced are deleted. So a reader sees the previous complete dataset or the new
complete one; a prepare that fails or is killed at any moment leaves the previous dataset
published and whole (a failure removes its own version; a kill or an interrupt leaves an
unpublished one, its staging, which the next prepare with the same arguments and source resumes,
keeping its validation and finished shards (`resume`), and any other deletes as stale).

A reader that read the manifest (`pipeline.read_split`) streams the one version it names. That
version is deleted right after a newer one is published, not kept a generation longer (which
would double the storage of every dataset): a job still streaming it then fails on the first
shard that is gone, with the error naming that shard's path under its version, and reads the
new version when run again.

Concurrent prepares to one `out` end with one published dataset and one clear error: locally a
lock (`<out>/.prepare.lock`) lets one write at a time and the other fails at once; on a store
each prepare records the manifest it started from and re-reads it just before publishing: if
another prepare published meanwhile, it removes its own version and fails, naming `out`. (The
check and the write are two requests, as the store has no conditional write: two prepares that
publish within one request of each other are sorted out after the fact, `_confirm_published`.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rsrefseg.platform import atomic, storage
from rsrefseg.platform.console import ProgressBar

from . import resume
from .fiftyone import read_fiftyone
from .imagefiles import DEFAULT_MASK_THRESHOLD, DEFAULT_MAX_PIXELS
from .nwpu_refer import read_nwpu_refer
from .refsegrs import read_refsegrs
from .remotesam import read_remotesam
from .risbench import read_risbench
from .rrsisd import read_rrsisd
from .shard_codec import ENCODING, PIXEL_COMPRESSION, RAW, encode_image, encode_mask, shipped_bytes
from .synthetic import read_synthetic
from .triplet import DatasetError, Issue, Triplet

log = logging.getLogger(__name__)

# 2: the category column; 3: raw pixels (shard_codec) instead of PNG, then the `encoding` column
# (images as shipped); a schema-3 shard without that column is all raw and reads as before.
SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
EXPECTED_SPLITS = ("train", "val", "test")
# Formats whose test split ships in parts: every part must have samples.
EXPECTED_SPLITS_OF = {"remotesam": ("train", "val", "testA", "testB")}

# The readers, by the format names of `rsrefseg prepare --format`. "synthetic" is a folder that
# synthetic.generate() wrote, which is the RefSegRS layout with categories the generator knows.
READERS: dict[str, Callable[..., Iterator[Triplet]]] = {
    "refsegrs": read_refsegrs,
    "synthetic": read_synthetic,
    "rrsisd": read_rrsisd,
    "fiftyone": read_fiftyone,
    "risbench": read_risbench,
    "nwpu-refer": read_nwpu_refer,
    "remotesam": read_remotesam,
}
# The readers that take `keep_non_english` (keep the Chinese or mixed expressions; counted either way).
LANGUAGE_OPTION = ("risbench", "nwpu-refer", "remotesam")

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),  # what the phrase refers to; "" = unknown
        pa.field("image", pa.binary(), nullable=False),  # the file's bytes or raw RGB pixels (shard_codec)
        pa.field("mask", pa.binary(), nullable=False),  # packed bits (shard_codec)
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),  # position in the split (sorted by id)
        pa.field("encoding", pa.string(), nullable=False),  # how `image` is stored: raw, jpeg, png
    ]
)

# Shard bounds. Ray Data reads a file in one task and preprocesses each block in one map task, so
# the shard size sets the unit of parallelism and of file-order shuffling: 64 rows (~50 MB of
# 512x512 pixels once read) keep both CPUs busy from a few hundred samples on. The byte bound
# (pixels, before compression) keeps shards of large images within a few hundred MB.
ROWS_PER_SHARD = 64
MAX_SHARD_BYTES = 256 << 20
ROWS_PER_ROW_GROUP = 16
DICTIONARY_PAGE_BYTES = 64 << 20  # a row group's distinct images (16 x 800 x 800 x 3 = 31 MB)
MAX_LISTED_ISSUES = 20
# What prepare writes inside a dataset besides manifest.json, and so what it may delete there: a
# version's shards (`v-TIME-RANDOM/split/part-NNNNN.parquet`), the shards of a dataset prepared
# before versions (`split/part-NNNNN.parquet`) and, in a local folder, the lock.
VERSION = resume.VERSION
SHARD_KEY = re.compile(rf"(?:(?P<version>{VERSION.pattern})/)?[^/]+/part-\d{{5}}\.parquet")
# A version's resume journal (`resume`), anything under `v-.../.resume/`.
JOURNAL_KEY = re.compile(rf"{VERSION.pattern}/{re.escape(resume.JOURNAL)}/.+")
LOCK = ".prepare.lock"


def prepare_dataset(
    fmt: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    skip_invalid: bool = False,
    rows_per_shard: int = ROWS_PER_SHARD,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    workers: Optional[int] = None,
    mask_threshold: int = DEFAULT_MASK_THRESHOLD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_non_english: Optional[bool] = None,
    progress: bool = False,
    ray_address: Optional[str] = None,
) -> dict[str, Any]:
    """Validate the dataset at `root` (format `fmt`) and write it to `out`; return the manifest.

    fmt: one of READERS ("refsegrs", "rrsisd", "fiftyone", "synthetic", "risbench", "nwpu-refer", "remotesam").
    skip_invalid: leave invalid samples out (listed in manifest["skipped"]) instead of raising;
        a split left empty still raises.
    workers: threads decoding and encoding images (default: the CPU count, at most 8); unused
        with `ray_address`.
    mask_threshold: 8-bit mask values at or above it are foreground (README "Mask policy").
    max_pixels: an image or mask whose header declares more pixels is refused before decoding.
    keep_non_english: keep (True) or leave out (False, the readers' default) the Chinese or mixed
        expressions of the formats in LANGUAGE_OPTION; their count is in the manifest's warnings.
    progress: show a progress bar (rate, ETA) on stderr while validating and writing, where
        stderr is a terminal (`console.ProgressBar`).
    ray_address: decode on the Ray cluster at this address (what `ray.init(address=...)` takes:
        "auto", "HOST:6379", "ray://HOST:10001") instead of local threads (`cluster_pool`); every
        node must see `root` at the same path. The dataset written is the same, byte for byte.

    A prepare interrupted or killed before it published is resumed by the next one with the same
    arguments and the same source (`resume`): it keeps the validation and the finished shards.
    """
    _check_arguments(fmt, mask_threshold)
    options = {} if keep_non_english is None else {"keep_non_english": keep_non_english}
    if options and fmt not in LANGUAGE_OPTION:
        raise DatasetError(f"keep_non_english applies to the formats {', '.join(LANGUAGE_OPTION)}, not {fmt!r}")
    # A cluster's tasks open the samples' files by the paths the reader builds from the root: a
    # relative root would resolve against each worker's own working directory.
    root, out = (Path(root).absolute() if ray_address else Path(root)), storage.location(out)
    if isinstance(out, storage.RemotePath):
        # Before any decoding: a missing bucket or a key that may not write fails in a second.
        storage.check_writable("--out", str(out))
    _check_replaceable(out)
    request = _Request(fmt, root, out, skip_invalid=skip_invalid, rows_per_shard=rows_per_shard,
                       max_shard_bytes=max_shard_bytes, workers=workers or min(8, os.cpu_count() or 1),
                       mask_threshold=mask_threshold, max_pixels=max_pixels, options=options, progress=progress,
                       ray_address=ray_address or None)
    with _on_cluster(request):
        if isinstance(out, storage.RemotePath):
            manifest = _publish_remote(out, lambda locked: _prepare(request, locked))
        else:
            manifest = _publish_local(out, lambda locked: _prepare(request, locked))
    log.debug("prepared %s: %s", out, manifest["counts"])  # the job says it to the user
    return manifest


@dataclass(frozen=True)
class _Request:
    """One prepare's arguments, checked."""

    fmt: str
    root: Path
    out: storage.Location
    skip_invalid: bool
    rows_per_shard: int
    max_shard_bytes: int
    workers: int
    mask_threshold: int
    max_pixels: int
    options: dict
    progress: bool
    ray_address: Optional[str] = None  # decode on this Ray cluster (None: local threads)

    def settings(self) -> dict[str, Any]:
        """What the shards depend on besides the source (the resume fingerprint's part; the
        thread count and the Ray address change no byte, so they are not in it)."""
        return {
            "format": self.fmt, "root": str(self.root.resolve()), "options": self.options,
            "skip_invalid": self.skip_invalid, "mask_threshold": self.mask_threshold, "max_pixels": self.max_pixels,
            "rows_per_shard": self.rows_per_shard, "max_shard_bytes": self.max_shard_bytes,
            "schema_version": SCHEMA_VERSION, "compression": PIXEL_COMPRESSION,
            "rows_per_row_group": ROWS_PER_ROW_GROUP, "dictionary_page_bytes": DICTIONARY_PAGE_BYTES,
        }


def _prepare(request: _Request, locked: bool) -> dict[str, Any]:
    """Validate, write and publish (holding `out`'s lock when `locked`). Every sample is
    validated before anything is written: bad input never touches the output. A staging of an
    earlier prepare with the same fingerprint is resumed: its validation and finished shards kept."""
    out = request.out
    triplets, issues, reader_notes = _read(request)
    local_out = out if not isinstance(out, storage.RemotePath) else None
    fingerprint = resume.fingerprint(request.settings(), request.root, triplets, skip=local_out)
    base = _published_text(out)  # the published dataset this one replaces (None: none)
    resumed = resume.find(out, fingerprint, _named_versions(base), locked=locked)
    recorded = resume.load_validation(out, resumed, fingerprint) if resumed else None
    valid, issues, notes, validation = _validate(request, triplets, issues, reader_notes, recorded)
    by_split = _group_by_split(valid)

    def stage() -> resume.Staging:
        return _stage(request, by_split, fingerprint, resumed, validation, base, locked)

    def write(staging: resume.Staging) -> dict[str, Any]:
        """The shards under the staging's version (those it lacks), and the manifest that lists
        them (paths relative to the version: `_in_version` makes them relative to `out`)."""
        shards, largest, digests = _write_shards(staging, by_split, request)
        return _manifest(request.fmt, request.root, by_split, shards, largest, digests,
                         mask_threshold=request.mask_threshold, issues=issues, notes=notes)

    return _publish(out, base, stage, write)


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared dataset folder (a local path, or a URI: s3://BUCKET/PREFIX)."""
    text = _read_text(str(path).rstrip("/") + "/" + MANIFEST)
    if text is None:
        raise DatasetError(
            f"{path} is not a prepared dataset: {str(path).rstrip('/')}/{MANIFEST} is missing. "
            "Run `rsrefseg prepare` to create it."
        )
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}/{MANIFEST}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}/{MANIFEST}: schema_version {version} is not {SCHEMA_VERSION}; "
            "run `rsrefseg prepare` again with this version"
        )
    _check_shard_paths(manifest, f"{str(path).rstrip('/')}/{MANIFEST}")
    return manifest


def shard_path_problem(relative: Any) -> Optional[str]:
    """Why a manifest's shard path would read outside its dataset (None: it is inside). A shard
    path is relative to the dataset folder or prefix: no leading '/', no scheme or drive (':'),
    no '..' or '.' or empty segment, no backslash."""
    if not isinstance(relative, str) or not relative:
        return "it is not a path"
    if relative.startswith("/"):
        return "it is absolute"
    if ":" in relative or "\\" in relative:
        return "it names a scheme, a drive or a Windows path"
    if any(part in ("", ".", "..") for part in relative.split("/")):
        return "it has a '..', '.' or empty segment"
    return None


def check_shard_path(manifest_path: str, split: str, relative: Any) -> str:
    """`relative`, a shard path of the manifest at `manifest_path`, once it is known to lie
    inside the dataset; else a DatasetError naming the manifest and the path."""
    problem = shard_path_problem(relative)
    if problem:
        raise DatasetError(
            f"{manifest_path}: shard {relative!r} of split {split!r} is not inside the dataset ({problem}); "
            "a manifest lists its shards relative to its own folder. Run `rsrefseg prepare` again"
        )
    return relative


def _check_shard_paths(manifest: dict[str, Any], manifest_path: str) -> None:
    """Every shard path of the manifest lies inside its dataset (`check_shard_path`)."""
    shards = manifest.get("shards", {})
    if not isinstance(shards, dict) or not all(isinstance(v, list) for v in shards.values()):
        raise DatasetError(f"{manifest_path}: 'shards' is not a mapping of split to a list of shards")
    for split, listed in shards.items():
        for shard in listed:
            check_shard_path(manifest_path, split, shard.get("path") if isinstance(shard, dict) else shard)


def natural_key(text: Optional[str]) -> tuple:
    """Sort "2" before "10" (RefSegRS ids are numbers), any string still sorts."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text or "") if part)


# --------------------------------------------------------------------------------------------
# Validation


def _check_arguments(fmt: str, mask_threshold: int) -> None:
    """Refuse a bad format or threshold before touching the input or the output."""
    if fmt not in READERS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose one of {', '.join(READERS)}")
    if not 1 <= mask_threshold <= 255:
        raise DatasetError(f"mask threshold must be within 1..255 (8-bit values at or above it are foreground), got {mask_threshold}")


def _read(request: _Request) -> tuple[list[Triplet], list[Issue], list[Issue]]:
    """1. Metadata: every declared sample (duplicate ids and ids in two splits dropped), the
    problems visible without pixels, and the readers' notes (samples kept as they are)."""
    issues: list[Issue] = []
    reader = READERS[request.fmt]
    triplets = list(reader(request.root, on_issue=issues.append, mask_threshold=request.mask_threshold,
                           max_pixels=request.max_pixels, **request.options))
    reader_notes = [i for i in issues if i.kind == "note"]  # kept as they are, said in the warnings
    issues = [i for i in issues if i.kind != "note"]
    return _drop_bad_ids(triplets, issues), issues, reader_notes


def _validate(
    request: _Request, triplets: list[Triplet], issues: list[Issue], reader_notes: list[Issue],
    recorded: Optional[resume.Validation],
) -> tuple[list[Triplet], list[Issue], list[Issue], resume.Validation]:
    """2. Pixels: decode every sample once, or take what a resumed staging recorded of that
    (the same source, the same outcome). Returns the samples to write, the problems found (the
    skipped samples), the notes (samples kept with a change) and the pixels' outcome. Raises one
    DatasetError listing every problem unless `skip_invalid` may skip them all; a split left
    empty raises regardless."""
    if recorded is None:
        before = len(issues)
        with ProgressBar("validating", len(triplets), enabled=request.progress) as bar:
            valid, pixel_notes = _check_pixels(triplets, issues, request, bar)
        validation = resume.Validation(issues[before:], pixel_notes)
    else:
        validation, left_out = recorded, {i.id for i in recorded.issues}
        valid, issues = [t for t in triplets if t.id not in left_out], issues + recorded.issues
        log.info("resuming: the validation of %d sample(s) is kept from the interrupted prepare", len(triplets))
    notes = reader_notes + validation.notes
    _check_empty_splits(valid, triplets, issues, request.root, EXPECTED_SPLITS_OF.get(request.fmt, EXPECTED_SPLITS))
    if any(i.kind == "split" for i in issues) or (issues and not request.skip_invalid):
        raise DatasetError(_summary(issues, request.fmt, request.root, request.skip_invalid))
    return valid, issues, notes, validation


def _check_pixels(
    triplets: list[Triplet], issues: list[Issue], request: _Request, bar: Optional[ProgressBar] = None
) -> tuple[list[Triplet], list[Issue]]:
    """Decode every sample (`_decoders`), a bounded window of them at a time. Returns the valid
    samples and the notes on those kept with a change; the invalid ones are added to `issues`."""
    valid, notes = [], []
    with _decoders(request) as (pool, window):
        for t, found in zip(triplets, bounded_map(pool, _pixel_check, triplets, window)):
            if found is None or found.kind == "note":
                valid.append(t)
                notes.extend([found] if found else [])
            else:
                issues.append(found)
            if bar is not None:
                bar.update()
    return valid, notes


@contextlib.contextmanager
def _decoders(request: _Request) -> Iterator[tuple[Executor, int]]:
    """The pool that decodes the samples of one pass, and how many samples may be in flight:
    local threads (tifffile, zlib and Pillow release the GIL), or with `ray_address` the
    cluster's tasks (`cluster_pool`). Either way the results come back in order."""
    if request.ray_address is None:
        with ThreadPoolExecutor(request.workers) as pool:
            yield pool, 4 * request.workers
        return
    from .cluster_pool import ClusterPool

    with ClusterPool(request.root) as pool:
        yield pool, pool.window


@contextlib.contextmanager
def _on_cluster(request: _Request) -> Iterator[None]:
    """With `ray_address`: joined to that Ray for the block, once every node has been seen to
    see the source (before anything is read or written). Without it: nothing (no Ray import)."""
    if request.ray_address is None:
        yield
        return
    from .cluster_pool import check_source_visible, joined

    with joined(request.ray_address):
        check_source_visible(request.root)
        yield


def _drop_bad_ids(triplets: list[Triplet], issues: list[Issue]) -> list[Triplet]:
    """A duplicate id keeps its first occurrence; an id declared in two splits is dropped from
    both, since which split it belongs to is unknown and keeping it could leak test data."""
    first: dict[str, Triplet] = {}
    splits: dict[str, set[str]] = {}
    for t in triplets:
        splits.setdefault(t.id, set()).add(t.split)
    kept = []
    for t in triplets:
        if len(splits[t.id]) > 1:
            others = ", ".join(sorted(splits[t.id] - {t.split}))
            issues.append(t.issue(f"the same id is also in split(s) {others}"))
        elif t.id in first:
            issues.append(t.issue(f"duplicate id (first declared at {first[t.id].where})"))
        else:
            first[t.id] = t
            kept.append(t)
    return kept


def load_pair(t: Triplet) -> tuple[np.ndarray, np.ndarray, Optional[str]]:
    """The image, the mask at the image's size, and what was changed to get there (None: nothing).

    A size mismatch raises DatasetError, unless the format fits masks to images (RRSIS-D: nearest
    resize, as the authors' loaders do).
    """
    image, mask = t.load_image(), t.load_mask()
    if image.shape[:2] == mask.shape:
        return image, mask, None
    sizes = f"image {t.image_path} is {image.shape[1]}x{image.shape[0]} but mask {t.mask_path} is {mask.shape[1]}x{mask.shape[0]}"
    if not t.fit_mask_to_image:
        raise DatasetError(sizes)
    fitted = Image.fromarray(mask).resize((image.shape[1], image.shape[0]), Image.NEAREST)
    return image, np.asarray(fitted, dtype=bool), f"{sizes}: mask resized to the image (nearest)"


def _pixel_check(t: Triplet) -> Optional[Issue]:
    """None when the sample is fine, a "note" Issue when it is kept with a change, else the problem."""
    try:
        note = load_pair(t)[2]
    except DatasetError as exc:
        return t.issue(str(exc))
    return Issue(note, id=t.id, split=t.split, where=t.where or None, kind="note") if note else None


def _issue_order(d: dict) -> tuple:
    return (d["split"] or "", natural_key(d["id"]))


def _category_counts(by_split: dict[str, list[Triplet]]) -> dict[str, dict[str, int]]:
    """split -> category -> samples, categories by decreasing count ("" shows as "unknown")."""
    counts = {}
    for split in _split_order(by_split):
        per: dict[str, int] = {}
        for t in by_split.get(split, []):
            per[t.category or "unknown"] = per.get(t.category or "unknown", 0) + 1
        counts[split] = dict(sorted(per.items(), key=lambda kv: (-kv[1], kv[0])))
    return counts


def _check_empty_splits(
    valid: list[Triplet], declared: list[Triplet], issues: list[Issue], root: Path, expected: tuple = EXPECTED_SPLITS
) -> None:
    """Every expected split must have samples. A reader may already have named the empty split
    (with its file); otherwise say so here."""
    have = {t.split for t in valid}
    already = {i.split for i in issues if i.kind == "split"}
    for split in expected:
        if split in have or split in already:
            continue
        if split in {t.split for t in declared}:
            message = f"split {split!r} is empty: all its samples are invalid"
        else:
            message = f"split {split!r} is empty: {root} declares no {split} samples"
        issues.append(Issue(message, split=split, where=str(root), kind="split"))


def _summary(issues: list[Issue], fmt: str, root: Path, skip_invalid: bool) -> str:
    # Split-level problems first: with skip_invalid they are the reason nothing was written.
    issues = sorted(issues, key=lambda i: i.kind != "split")
    lines = [f"{len(issues)} problem(s) in the {fmt} dataset at {root}; nothing was written:"]
    lines += [f"  - {issue}" for issue in issues[:MAX_LISTED_ISSUES]]
    if len(issues) > MAX_LISTED_ISSUES:
        lines.append(f"  ... and {len(issues) - MAX_LISTED_ISSUES} more")
    skippable = any(issue.kind == "sample" for issue in issues)
    every_split = f"A prepared dataset needs samples in every split ({', '.join(EXPECTED_SPLITS_OF.get(fmt, EXPECTED_SPLITS))})."
    if not skippable:  # only empty splits in the source: skipping cannot help
        lines.append(every_split)
    elif skip_invalid:
        lines.append("Skipping invalid samples would leave a split empty. " + every_split)
    else:
        lines.append("Fix them, or prepare with --skip-invalid (skip_invalid=True in Python) to leave those samples "
                     "out (they are listed in manifest.json).")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Writing


def _group_by_split(valid: list[Triplet]) -> dict[str, list[Triplet]]:
    """split -> its samples, sorted by id (natural order): the order of the rows and of `index`."""
    by_split: dict[str, list[Triplet]] = {}
    for t in sorted(valid, key=lambda t: (t.split, natural_key(t.id))):
        by_split.setdefault(t.split, []).append(t)
    return by_split


def _write_shards(
    staging: resume.Staging, by_split: dict[str, list[Triplet]], request: _Request
) -> tuple[dict[str, list[dict]], dict[str, list[int]], list[str]]:
    """Every split's shards under the staging's version (after those it kept), one pool of
    encoders for them all (`_decoders`). Returns split -> shards (path, rows), split -> largest
    [height, width], and the samples' digests."""
    shards: dict[str, list[dict]] = {}
    largest: dict[str, list[int]] = {}
    digests: list[str] = []
    todo = sum(len(items) - staging.kept_rows(split) for split, items in by_split.items())
    with _decoders(request) as (pool, window), ProgressBar("writing", todo, enabled=request.progress) as bar:
        for split in _split_order(by_split):
            if split in by_split:
                writer = _SplitWriter(staging, split, request.rows_per_shard, request.max_shard_bytes)
                writer.write(by_split[split], pool, window, bar)
                shards[split], largest[split] = writer.shards, writer.largest
                digests.extend(writer.digests)
    return shards, largest, digests


def _manifest(
    fmt: str, root: Path, by_split: dict[str, list[Triplet]], shards: dict[str, list[dict]], largest: dict[str, list[int]],
    digests: list[str], *, mask_threshold: int, issues: list[Issue], notes: list[Issue],
) -> dict[str, Any]:
    """The manifest of the written shards (its keys in the order manifest.json shows them)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "format": fmt,
        "source": str(root.resolve()),
        "counts": {split: len(by_split.get(split, [])) for split in _split_order(by_split)},
        "categories": _category_counts(by_split),
        "largest_image": largest,  # split -> [height, width], each the split's maximum
        "shards": shards,
        "columns": SCHEMA.names,
        "encoding": {**ENCODING, "compression": PIXEL_COMPRESSION},
        "mask_threshold": mask_threshold,
        "skipped": sorted((i.to_dict() for i in issues), key=_issue_order),
        "warnings": [str(i) for i in sorted(notes, key=lambda i: _issue_order(i.to_dict()))],
        "content_hash": _content_hash(digests),
    }


def _encode(t: Triplet) -> tuple[bytes, bytes, int, int, str, str]:
    """(image bytes, mask bytes, height, width, digest, the image's encoding). The digest hashes
    the decoded pixels, whichever way they are stored: keeping a JPEG's bytes instead of its raw
    pixels leaves a dataset's content_hash as it was, and a re-prepare gives the same one."""
    image, mask, _ = load_pair(t)
    digest = "\t".join([t.id, t.phrase, t.split, t.category, _array_digest(image), _array_digest(np.packbits(mask), mask.shape)])
    shipped = shipped_bytes(t.image_path, image)
    data, encoding = shipped if shipped is not None else (encode_image(image), RAW)
    return data, encode_mask(mask), image.shape[0], image.shape[1], digest, encoding


def _array_digest(array: np.ndarray, shape: Optional[tuple] = None) -> str:
    # Hash of the decoded pixels, not of the stored bytes: stable across storage formats.
    h = hashlib.sha256(repr((shape or array.shape, str(array.dtype))).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _content_hash(digests: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in sorted(digests):
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


class _SplitWriter:
    """The shards of one split under a staging: rows in order, a shard closed at the row or the
    byte bound and journaled once whole (`resume.record_shard`), the shards the staging kept
    taken as they are. The bounds depend only on the rows, so a resumed split is cut as an
    uninterrupted one is."""

    def __init__(self, staging: resume.Staging, split: str, rows_per_shard: int, max_bytes: int):
        self.staging, self.split, self.rows_per_shard, self.max_bytes = staging, split, rows_per_shard, max_bytes
        kept = staging.kept.get(split, [])
        self.shards = [{"path": r["path"], "rows": r["rows"]} for r in kept]
        self.largest = [max([0] + [r["largest"][k] for r in kept]) for k in (0, 1)]
        self.digests = [d for r in kept for d in r["digests"]]
        self.file: Optional[_ShardFile] = None
        self.rows: list[tuple] = []  # of the row group being filled
        self.shard_digests: list[str] = []
        self.shard_largest = [0, 0]
        self.shard_bytes = 0

    def write(self, items: list[Triplet], pool: Executor, window: int, bar: ProgressBar) -> None:
        """Write the split's samples `items` (all of them, sorted), those the staging kept skipped."""
        start = sum(s["rows"] for s in self.shards)
        target = self.staging.out / self.staging.version
        (target / self.split).mkdir(parents=True, exist_ok=True)  # an object store has no folders
        todo = items[start:]
        try:
            for index, (t, encoded) in enumerate(zip(todo, bounded_map(pool, _encode, todo, window)), start=start):
                self._add(target, index, t, encoded)
                bar.update()
            self._close_shard()
        except BaseException:
            if self.file is not None:  # closed now, not whenever it is collected (after the caller's cleanup)
                self.file.abort()
            raise

    def _add(self, target: storage.Location, index: int, t: Triplet, encoded: tuple) -> None:
        image, mask, height, width, digest, encoding = encoded
        size = len(image) + len(mask)
        if self.file is not None and (len(self.shard_digests) >= self.rows_per_shard or self.shard_bytes + size > self.max_bytes):
            self._close_shard()
        if self.file is None:
            path = f"{self.split}/part-{len(self.shards):05d}.parquet"
            self.file = _open_shard(target, path)
            self.shards.append({"path": path, "rows": 0})
        self.rows.append((t.id, t.phrase, t.split, t.category, image, mask, height, width, index, encoding))
        self.shard_digests.append(digest)
        self.shard_bytes += size
        self.shard_largest = [max(self.shard_largest[0], height), max(self.shard_largest[1], width)]
        if len(self.rows) >= ROWS_PER_ROW_GROUP:
            self._flush_group()

    def _flush_group(self) -> None:
        if self.rows:
            columns = list(zip(*self.rows))
            arrays = [pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA)]
            self.file.writer.write_table(pa.Table.from_arrays(arrays, schema=SCHEMA))
            self.rows = []

    def _close_shard(self) -> None:
        """Close the open shard (whole from now on: uploaded, on a store), then journal it."""
        if self.file is None:
            return
        self._flush_group()
        size, sha256 = self.file.close()
        shard, rows = self.shards[-1], len(self.shard_digests)
        shard["rows"] = rows
        record = resume.shard_record(shard["path"], rows, size, sha256, self.shard_largest, self.shard_digests)
        resume.record_shard(self.staging, self.split, len(self.shards) - 1, record)
        self.digests.extend(self.shard_digests)
        self.largest = [max(a, b) for a, b in zip(self.largest, self.shard_largest)]
        self.file, self.shard_digests, self.shard_largest, self.shard_bytes = None, [], [0, 0], 0


class _ShardFile:
    """A shard being written: its Parquet writer, over a sink that hashes the bytes it passes on."""

    def __init__(self, writer: pq.ParquetWriter, sink: resume.HashingSink):
        self.writer, self.sink = writer, sink

    def close(self) -> tuple[int, str]:
        """Finish the file; its size and SHA-256."""
        self.writer.close()
        self.sink.close()
        return self.sink.size, self.sink.hexdigest()

    def abort(self) -> None:
        for close in (self.writer.close, self.sink.close):
            try:
                close()
            except Exception:
                pass


def _open_shard(target: storage.Location, path: str) -> _ShardFile:
    """A Parquet writer of the shard `path` (split/part-NNNNN.parquet) under `target`: a local
    file, or an object the store receives as it is written (multipart upload, no local copy)."""
    from pyarrow import fs

    # A codec that decodes fast (shard_codec), no min/max statistics on the pixel columns
    # (useless there, and costly to compute), and dictionary encoding on them too: the
    # phrases of one image (RRSIS-D's "6_0", "6_1", ...) sit side by side, and a row
    # group then stores that image once (synthetic set: 230 instead of 772 KiB a row).
    options = dict(
        compression=PIXEL_COMPRESSION,
        use_dictionary=["phrase", "split", "category", "image", "mask", "encoding"],
        dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES,
        write_statistics=["id", "split", "height", "width", "index"],
    )
    if isinstance(target, storage.RemotePath):
        raw = target.fs.open_output_stream(f"{target.path}/{path}")
    else:
        raw = fs.LocalFileSystem().open_output_stream(str(target / path))
    sink = resume.HashingSink(raw)
    try:
        return _ShardFile(pq.ParquetWriter(sink, SCHEMA, **options), sink)
    except BaseException:
        sink.close()
        raise


def _manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=False) + "\n"


def bounded_map(pool: Executor, fn: Callable, items: list, window: int) -> Iterator:
    """`pool.map` with at most `window` results in flight: Executor.map submits everything at
    once, which for encoded images would hold the whole dataset in memory."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _split_order(by_split: dict[str, list]) -> list[str]:
    return [s for s in EXPECTED_SPLITS if s in by_split] + sorted(s for s in by_split if s not in EXPECTED_SPLITS)


# --------------------------------------------------------------------------------------------
# The output folder: versions, published by the manifest


def _check_replaceable(out: storage.Location) -> None:
    """Replace only what prepare made: a folder or prefix with manifest.json, an empty one, or
    one holding nothing but what a killed prepare leaves (unpublished versions, the lock)."""
    if not out.exists():
        return
    if out.is_dir() and ((out / MANIFEST).is_file() or all(_is_leftover(name) for name in _files(out))):
        return
    raise DatasetError(
        f"refusing to write to {out}: it exists and is not a prepared dataset (no {MANIFEST}); "
        "choose another output folder or remove it"
    )


def _is_leftover(relative: str) -> bool:
    """Whether a file under a dataset (path relative to it) is one prepare writes besides the
    manifest: a shard, a version's resume journal, the lock, a manifest being written."""
    return (bool(SHARD_KEY.fullmatch(relative) or JOURNAL_KEY.fullmatch(relative)) or relative == LOCK
            or relative.startswith(f".{MANIFEST}.tmp-"))


def _files(out: storage.Location) -> list[str]:
    """The files under `out`, as paths relative to it."""
    if isinstance(out, storage.RemotePath):
        return _objects(out)
    return [p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir()]


def _publish_local(out: Path, prepare: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
    """`prepare(locked)` inside the folder `out`, holding its lock (one prepare at a time:
    another one fails at once, naming the folder; `locked` is False on a filesystem without
    locks). A folder this call created and left empty is removed again, as if nothing had been
    written."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _local_lock(out) as locked:
            _check_replaceable(out)  # again: someone may have written there meanwhile
            return prepare(locked)
    finally:
        if created and not (out / MANIFEST).exists():
            try:
                out.rmdir()  # only if empty: nothing of anyone else's is removed
            except OSError:
                pass


@contextlib.contextmanager
def _local_lock(out: Path) -> Iterator[bool]:
    """Hold `out/.prepare.lock` (flock, so the kernel releases it when its process dies, even by
    SIGKILL: a killed prepare never blocks the next), removed again on release; yields whether
    it is held. A filesystem without locks (some NFS mounts) gets a warning, and the manifest
    check (`_check_unchanged`) alone then guards against a concurrent prepare."""
    path = out / LOCK
    fd = _take_lock(out, path)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while still holding it
            os.close(fd)


def _take_lock(out: Path, path: Path) -> Optional[int]:
    """The descriptor of the locked `path`, None where the filesystem has no locks. A lock taken
    on a file its holder removed meanwhile is dropped and taken again on the new file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatasetError(
                f"another prepare is writing to {out} (it holds {path}); nothing was written: "
                "run this one again once it has finished"
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: this filesystem has no file locks (%s); writing without one", path, exc)
            path.unlink(missing_ok=True)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _publish_remote(out: storage.RemotePath, prepare: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
    """`prepare(False)` under the prefix `out` (an object store has no lock: concurrent prepares
    are told apart by the manifest each started from, `_publish`, and a staging by its owner)."""
    return prepare(False)


def _stage(
    request: _Request, by_split: dict[str, list[Triplet]], fingerprint: str, resumed: Optional[str],
    validation: resume.Validation, base: Optional[str], locked: bool,
) -> resume.Staging:
    """The version this prepare writes: the staging `resumed` (its finished shards checked and
    kept) or a new one, claimed (its journal names this process). Stagings no prepare will
    resume or publish are deleted here: ones of other arguments or sources whose owner is gone."""
    out = request.out
    _check_replaceable(out)  # again: someone may have written there meanwhile
    staging = resume.claim(out, resumed or _new_version(), fingerprint)
    try:
        for version in resume.abandoned(out, _named_versions(base) | {staging.version}, locked=locked):
            log.info("removing %s/%s, the staging of a prepare that will not be resumed", out, version)
            _remove_version(out, version)
        if not validation.recorded:
            resume.save_validation(staging, validation)
        if resumed:
            kept = resume.keep_finished(staging, by_split, request.workers)
            shards, rows = sum(len(v) for v in kept.values()), sum(staging.kept_rows(s) for s in kept)
            log.info("resuming the interrupted prepare %s/%s: kept %d finished shard(s) (%d samples), "
                     "checked against their recorded hashes", out, staging.version, shards, rows)
    except BaseException:
        resume.release(staging)
        raise
    return staging


def _publish(out: storage.Location, base: Optional[str], stage: Callable[[], resume.Staging],
             write: Callable[[resume.Staging], dict[str, Any]]) -> dict[str, Any]:
    """Write the version `stage()` gives under `out/v-...`, publish it by writing
    `out/manifest.json` (the published text was `base` when this prepare began), then delete the
    versions it replaced. Until the manifest is written the previous dataset stays published and
    whole. An interrupt (Ctrl-C, SIGTERM in the CLI) keeps the staging for the next prepare
    with the same arguments to resume; any other failure removes it (best effort: what a kill or
    an outage leaves, the next prepare resumes or removes)."""
    staging: Optional[resume.Staging] = None
    where = "staging"
    try:
        staging = stage()
        where = "writing"
        manifest = _in_version(write(staging), staging.version)
        _check_unchanged(out, base)
        where = "publishing"
        # The journal goes first: a published version is its shards alone (a kill just before
        # the manifest then costs the next prepare a full run, nothing more).
        resume.drop_journal(out, staging.version)
        atomic.write_text(out / MANIFEST, _manifest_text(manifest))
    except BaseException as exc:
        _after_failure(out, staging, where, exc)
        raise
    finally:
        if staging is not None:
            resume.release(staging)
    if _confirm_published(out, manifest, staging.version):
        _remove_stale(out, staging.version, base, _manifest_text(manifest))
    return manifest


def _after_failure(out: storage.Location, staging: Optional[resume.Staging], where: str, exc: BaseException) -> None:
    """What a failure of `_publish` while `where` ("staging", "writing", "publishing") leaves: an
    interrupt before publishing keeps the staging (resumable); otherwise the version is removed,
    except a remote manifest upload that failed (it may still have landed: then its shards must
    stay), a version published meanwhile (two prepares resuming one staging on a store) and a
    staging that failed to be set up (the next prepare resumes or removes it). A storage error
    is raised as a StorageError saying what is published now."""
    remote = isinstance(out, storage.RemotePath)
    if isinstance(exc, KeyboardInterrupt) and where != "publishing":
        if staging is not None:
            log.warning("interrupted: the shards finished so far are kept under %s/%s; run the same prepare "
                        "again to resume it", out, staging.version)
        return
    removable = staging is not None and (where == "writing" or not remote)
    if removable and staging.version not in _named_versions(_published_text_or_none(out)):
        _remove_version(out, staging.version)
    if remote and isinstance(exc, OSError) and "AWS Error" in str(exc):
        said = storage.describe(exc, str(out))
        if where != "publishing":
            raise storage.StorageError(f"--out: writing {out} failed, nothing was published there "
                                       f"(the previous dataset, if any, is unchanged): {said}") from exc
        raise storage.StorageError(f"--out: publishing {out}/{MANIFEST} failed; either the previous "
                                   f"dataset or this one is published there, whole: {said}") from exc


def _named_versions(manifest_text: Optional[str]) -> set[str]:
    """The versions whose shards a manifest's text lists (none for a dataset prepared before
    versions, or a text that is not a manifest)."""
    try:
        shards = json.loads(manifest_text or "{}").get("shards", {})
        paths = [shard["path"] for split in shards.values() for shard in split]
    except (ValueError, AttributeError, TypeError, KeyError):
        return set()
    return {m.group("version") for path in paths if isinstance(path, str)
            and (m := SHARD_KEY.fullmatch(path)) and m.group("version")}


def _published_text_or_none(out: storage.Location) -> Optional[str]:
    """The published manifest's text; None also when it cannot be read (the store is down)."""
    try:
        return _published_text(out)
    except (OSError, DatasetError):
        return None


def _new_version() -> str:
    """A version's name: its start time (UTC, to the millisecond, so names sort by age) and a
    random part (two prepares started in the same millisecond)."""
    now = datetime.now(timezone.utc)
    return f"v-{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:8]}"


def _in_version(manifest: dict[str, Any], version: str) -> dict[str, Any]:
    """The manifest with its shard paths relative to the dataset (`version/split/part-...`)
    rather than to the version. Nothing else changes: the content hash is of the samples."""
    manifest["shards"] = {split: [{**shard, "path": f"{version}/{shard['path']}"} for shard in shards]
                          for split, shards in manifest["shards"].items()}
    return manifest


def _published_text(out: storage.Location) -> Optional[str]:
    return _read_text(str(out).rstrip("/") + "/" + MANIFEST)


def _check_unchanged(out: storage.Location, base: Optional[str]) -> None:
    """Just before publishing: fail if another prepare published at `out` since this one began
    (it would otherwise replace that one's dataset unseen, or interleave with it)."""
    if _published_text(out) != base:
        raise DatasetError(
            f"another prepare published a dataset at {out} while this one was writing; its dataset stays "
            "published and this one's shards were removed: run prepare again to replace it"
        )


def _confirm_published(out: storage.Location, manifest: dict[str, Any], version: str) -> bool:
    """After publishing: whether `out/manifest.json` is this prepare's. Two prepares that both
    passed `_check_unchanged` (an object store has no conditional write, so the check and the
    write are two requests) publish one after the other, and the first one then fails here,
    removing its version. False when the manifest cannot be read back: nothing is deleted then."""
    try:
        text = _published_text(out)
    except DatasetError as exc:
        log.warning("published %s, but could not read its manifest back (%s); old versions are kept", out, exc)
        return False
    if text != _manifest_text(manifest):
        _remove_version(out, version)
        raise DatasetError(
            f"another prepare published a dataset at {out} at the same moment as this one; its dataset stays "
            "published and this one's shards were removed: run prepare again to replace it"
        )
    return True


def _remove_stale(out: storage.Location, current: str, base: Optional[str], ours: str) -> None:
    """Once `current` is published (its manifest text `ours`): delete the versions it replaced
    and the leftovers of killed prepares, and the shards of a dataset prepared before versions
    (directly under their split). In a local folder (locked: no other prepare writes there) that
    is every other version. Under a prefix it is every other version that started before
    `current`: a later one may be another prepare still writing, which will find this manifest,
    fail and remove its own. Best effort: what cannot be deleted is left for the next prepare."""
    try:
        if _published_text(out) != ours:
            return  # published over since then: the prepare that did so cleans up
        stale = _stale_versions(out, current, base)
        for version in stale:
            _remove_version(out, version)
        _restore_if_overwritten(out, ours, stale)
    except (OSError, DatasetError) as exc:
        log.warning("could not delete old versions under %s: %s", out, _describe(exc, out))


def _stale_versions(out: storage.Location, current: str, base: Optional[str]) -> list[str]:
    """The versions `_remove_stale` deletes; the shards of a dataset prepared before versions
    are deleted here. Under a prefix, a version that started after `current` is deleted too when
    it is a staging whose owner is gone (`resume.abandoned`): a resumed `current` keeps the name
    of the prepare that started it."""
    remote = isinstance(out, storage.RemotePath)
    if remote:
        keys = [(key, m) for key in _objects(out) if (m := SHARD_KEY.fullmatch(key))]
        versions = {m.group("version") for _, m in keys if m.group("version")}
        for key in [key for key, m in keys if not m.group("version")]:
            (out / key).unlink(missing_ok=True)
        versions = {v for v in versions if v < current} | set(resume.abandoned(out, {current}, locked=False))
    else:
        versions = {p.name for p in out.iterdir() if VERSION.fullmatch(p.name)}
        for split in _unversioned_splits(base):
            shutil.rmtree(out / split, ignore_errors=True)
        atomic.clear_stale_siblings(out / MANIFEST)  # `.manifest.json.tmp-*` of killed prepares
    return sorted(v for v in versions if v != current)


def _restore_if_overwritten(out: storage.Location, ours: str, deleted: list[str]) -> None:
    """An object store has no conditional write, so a prepare that passed its check just before
    this one published may still publish just after it, naming a version deleted here. Then
    this one's manifest (its version is whole) is put back; that prepare fails on reading it
    back (`_confirm_published`). One dataset stays published, whole."""
    text = _published_text(out)
    if text is None or text == ours:
        return
    try:
        named = {s["path"].split("/")[0] for split in json.loads(text)["shards"].values() for s in split}
    except (ValueError, AttributeError, TypeError, KeyError):
        return
    if named & set(deleted):
        atomic.write_text(out / MANIFEST, ours)
        log.warning("%s: a concurrent prepare published a version this one had just deleted; republished this one", out)


def _describe(exc: BaseException, out: storage.Location) -> str:
    return storage.describe(exc, str(out)) if isinstance(out, storage.RemotePath) else str(exc)


def _unversioned_splits(manifest_text: Optional[str]) -> set[str]:
    """The split folders of a dataset prepared before versions (its shards at `split/part-*`)."""
    try:
        shards = json.loads(manifest_text or "{}").get("shards", {})
        paths = [shard["path"] for split in shards.values() for shard in split]
    except (ValueError, AttributeError, TypeError, KeyError):
        return set()
    # Only paths that passed load_manifest's check: a split named ".." must not delete the parent.
    return {path.split("/")[0] for path in paths
            if shard_path_problem(path) is None and (m := SHARD_KEY.fullmatch(path)) and not m.group("version")}


def _remove_version(out: storage.Location, version: str) -> None:
    """Delete the version `version` under `out`, best effort (logged when it cannot be)."""
    try:
        if isinstance(out, storage.RemotePath):
            out.fs.delete_dir(f"{out.path}/{version}")
        else:
            shutil.rmtree(out / version)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not delete %s/%s (the next prepare there removes it): %s", out, version, _describe(exc, out))


def _objects(out: storage.RemotePath) -> list[str]:
    """The objects under the prefix `out` (keys relative to it), without the empty "folder/"
    markers pyarrow's S3 filesystem leaves where it deleted a folder's last object: a prefix
    holding only markers holds nothing."""
    from pyarrow import fs

    found = out.fs.get_file_info(fs.FileSelector(out.path, recursive=True, allow_not_found=True))
    return [i.path[len(out.path) + 1:] for i in found if i.type == fs.FileType.File]


def _read_text(uri: str) -> Optional[str]:
    """A small text file from a local path or a URI (`storage.location`), None when it is missing."""
    where = storage.location(uri)
    if not isinstance(where, storage.RemotePath):
        return where.read_text(encoding="utf-8") if where.is_file() else None
    try:
        return where.read_text()
    except FileNotFoundError:
        answer = storage.missing_bucket(where)
        if answer:
            raise DatasetError(f"{where.parent} is not a prepared dataset: {answer}") from None
        return None
    except OSError as exc:
        raise DatasetError(f"cannot read {where}: {storage.describe(exc, str(where))}") from None
