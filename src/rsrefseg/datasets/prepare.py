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
input is bad. Images are stored as shipped (a JPEG or PNG file's own bytes) or raw, masks
bit-packed, under Parquet compression (`shard_codec`).

Publishing is versioned, the same way in a local folder and under an object-store prefix
(`s3://BUCKET/PREFIX`, which has no rename): each prepare writes a new version under its own
prefix `<out>/v-TIME-RANDOM/` (shards streamed straight to the store, no local copy), and the
version becomes the dataset only when `<out>/manifest.json` naming its shards is written (locally
write-then-rename, on a store one PUT, which replaces the object whole). Then, and only then, the
versions it replaced are deleted. So a reader sees the previous complete dataset or the new
complete one; a prepare that fails or is killed at any moment leaves the previous dataset
published and whole (a failure removes its own version; a kill leaves an unpublished one, which
the next prepare that publishes there deletes as stale).

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
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rsrefseg.platform import atomic, storage

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
VERSION = re.compile(r"v-\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}")
SHARD_KEY = re.compile(rf"(?:(?P<version>{VERSION.pattern})/)?[^/]+/part-\d{{5}}\.parquet")
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
) -> dict[str, Any]:
    """Validate the dataset at `root` (format `fmt`) and write it to `out`; return the manifest.

    fmt: one of READERS ("refsegrs", "rrsisd", "fiftyone", "synthetic", "risbench", "nwpu-refer", "remotesam").
    skip_invalid: leave invalid samples out (listed in manifest["skipped"]) instead of raising;
        a split left empty still raises.
    workers: threads decoding and encoding images (default: the CPU count, at most 8).
    mask_threshold: 8-bit mask values at or above it are foreground (README "Mask policy").
    max_pixels: an image or mask whose header declares more pixels is refused before decoding.
    keep_non_english: keep (True) or leave out (False, the readers' default) the Chinese or mixed
        expressions of the formats in LANGUAGE_OPTION; their count is in the manifest's warnings.
    """
    _check_arguments(fmt, mask_threshold)
    options = {} if keep_non_english is None else {"keep_non_english": keep_non_english}
    if options and fmt not in LANGUAGE_OPTION:
        raise DatasetError(f"keep_non_english applies to the formats {', '.join(LANGUAGE_OPTION)}, not {fmt!r}")
    root, out = Path(root), storage.location(out)
    if isinstance(out, storage.RemotePath):
        # Before any decoding: a missing bucket or a key that may not write fails in a second.
        storage.check_writable("--out", str(out))
    _check_replaceable(out)
    workers = workers or min(8, os.cpu_count() or 1)

    # Every sample is validated before anything is written: bad input never touches the output.
    valid, issues, notes = _validate(
        fmt, root, workers, skip_invalid=skip_invalid, mask_threshold=mask_threshold, max_pixels=max_pixels, options=options
    )

    # Write a new version (in the folder, or straight to the store), then publish it.
    by_split = _group_by_split(valid)

    def write(target: storage.Location) -> dict[str, Any]:
        """The shards under `target` (the version's folder or prefix), and the manifest that
        lists them (paths relative to `target`: `_in_version` makes them relative to `out`)."""
        shards, largest, digests = _write_shards(target, by_split, workers, rows_per_shard, max_shard_bytes)
        return _manifest(
            fmt, root, by_split, shards, largest, digests, mask_threshold=mask_threshold, issues=issues, notes=notes
        )

    if isinstance(out, storage.RemotePath):
        manifest = _publish_remote(out, write)
    else:
        manifest = _publish_local(out, write)
    log.debug("prepared %s: %s", out, manifest["counts"])  # the job says it to the user
    return manifest


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


def _validate(
    fmt: str, root: Path, workers: int, *, skip_invalid: bool, mask_threshold: int, max_pixels: int = DEFAULT_MAX_PIXELS,
    options: Optional[dict] = None,
) -> tuple[list[Triplet], list[Issue], list[Issue]]:
    """The samples to write, the problems found (the skipped samples) and the notes (samples kept
    with a change). Raises one DatasetError listing every problem unless `skip_invalid` may skip
    them all; a split left empty raises regardless."""
    # 1. Metadata: every declared sample, and the problems visible without pixels.
    issues: list[Issue] = []
    triplets = list(READERS[fmt](root, on_issue=issues.append, mask_threshold=mask_threshold, max_pixels=max_pixels, **(options or {})))
    reader_notes = [i for i in issues if i.kind == "note"]  # kept as they are, said in the warnings
    issues = [i for i in issues if i.kind != "note"]
    triplets = _drop_bad_ids(triplets, issues)

    # 2. Pixels: decode every sample once.
    valid, notes = _check_pixels(triplets, issues, workers)
    notes = reader_notes + notes

    _check_empty_splits(valid, triplets, issues, root, EXPECTED_SPLITS_OF.get(fmt, EXPECTED_SPLITS))
    if any(i.kind == "split" for i in issues) or (issues and not skip_invalid):
        raise DatasetError(_summary(issues, fmt, root, skip_invalid))
    return valid, issues, notes


def _check_pixels(triplets: list[Triplet], issues: list[Issue], workers: int) -> tuple[list[Triplet], list[Issue]]:
    """Decode every sample (threads: tifffile, zlib and Pillow release the GIL), a bounded window
    of them at a time. Returns the valid samples and the notes on those kept with a change; the
    invalid ones are added to `issues`."""
    valid, notes = [], []
    with ThreadPoolExecutor(workers) as pool:
        for t, found in zip(triplets, bounded_map(pool, _pixel_check, triplets, 4 * workers)):
            if found is None or found.kind == "note":
                valid.append(t)
                notes.extend([found] if found else [])
            else:
                issues.append(found)
    return valid, notes


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
    target: storage.Location, by_split: dict[str, list[Triplet]], workers: int, rows_per_shard: int, max_shard_bytes: int
) -> tuple[dict[str, list[dict]], dict[str, list[int]], list[str]]:
    """Every split's shards under `target`, one pool of encoding threads for them all. Returns
    split -> shards (path, rows), split -> largest [height, width], and the samples' digests."""
    shards: dict[str, list[dict]] = {}
    largest: dict[str, list[int]] = {}
    digests: list[str] = []
    with ThreadPoolExecutor(workers) as pool:
        for split in _split_order(by_split):
            if split in by_split:
                shards[split], largest[split] = _write_split(
                    target, split, by_split[split], pool, 4 * workers, digests, rows_per_shard, max_shard_bytes
                )
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


def _write_split(
    target: storage.Location, split: str, items: list[Triplet], pool: ThreadPoolExecutor, window: int, digests: list[str],
    rows_per_shard: int, max_bytes: int,
) -> tuple[list[dict], list[int]]:
    """The split's shards (path, rows) and its largest image height and width."""
    (target / split).mkdir(parents=True)  # an object store has no folders: nothing to do there
    shards: list[dict] = []
    writer: Optional[pq.ParquetWriter] = None
    rows: list[tuple] = []
    shard_rows = shard_bytes = 0
    largest = [0, 0]

    def flush_group() -> None:
        nonlocal rows
        if rows:
            columns = list(zip(*rows))
            writer.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA)], schema=SCHEMA))
            rows = []

    def close_shard() -> None:
        nonlocal writer, shard_rows, shard_bytes
        if writer is not None:
            flush_group()
            writer.close()
            shards[-1]["rows"] = shard_rows
            writer, shard_rows, shard_bytes = None, 0, 0

    try:
        for index, (t, (image, mask, height, width, digest, encoding)) in enumerate(zip(items, bounded_map(pool, _encode, items, window))):
            if writer is not None and (shard_rows >= rows_per_shard or shard_bytes + len(image) + len(mask) > max_bytes):
                close_shard()
            if writer is None:
                path = f"{split}/part-{len(shards):05d}.parquet"
                writer = _open_shard(target, path)
                shards.append({"path": path, "rows": 0})
            rows.append((t.id, t.phrase, t.split, t.category, image, mask, height, width, index, encoding))
            shard_rows += 1
            shard_bytes += len(image) + len(mask)
            largest = [max(largest[0], height), max(largest[1], width)]
            digests.append(digest)
            if len(rows) >= ROWS_PER_ROW_GROUP:
                flush_group()
        close_shard()
    except BaseException:
        if writer is not None:  # closed now, not whenever it is collected (after the caller's cleanup)
            try:
                writer.close()
            except Exception:
                pass
        raise
    return shards, largest


def _open_shard(target: storage.Location, path: str) -> pq.ParquetWriter:
    """A Parquet writer of the shard `path` (split/part-NNNNN.parquet) under `target`: a local
    file, or an object the store receives as it is written (multipart upload, no local copy)."""
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
        return pq.ParquetWriter(f"{target.path}/{path}", SCHEMA, filesystem=target.fs, **options)
    return pq.ParquetWriter(target / path, SCHEMA, **options)


def _manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=False) + "\n"


def bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: list, window: int) -> Iterator:
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
    manifest: a shard, the lock, a manifest being written."""
    return bool(SHARD_KEY.fullmatch(relative)) or relative == LOCK or relative.startswith(f".{MANIFEST}.tmp-")


def _files(out: storage.Location) -> list[str]:
    """The files under `out`, as paths relative to it."""
    if isinstance(out, storage.RemotePath):
        return _objects(out)
    return [p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir()]


def _publish_local(out: Path, write: Callable[[storage.Location], dict[str, Any]]) -> dict[str, Any]:
    """Publish a new version inside the folder `out`, holding its lock (one prepare at a time:
    another one fails at once, naming the folder). A folder this call created and did not
    publish to is removed again, as if nothing had been written."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _local_lock(out):
            _check_replaceable(out)  # again: someone may have written there meanwhile
            return _publish(out, write)
    finally:
        if created and not (out / MANIFEST).exists():
            try:
                out.rmdir()  # only if empty: nothing of anyone else's is removed
            except OSError:
                pass


@contextlib.contextmanager
def _local_lock(out: Path) -> Iterator[None]:
    """Hold `out/.prepare.lock` (flock, so the kernel releases it when its process dies, even by
    SIGKILL: a killed prepare never blocks the next), removed again on release. A filesystem
    without locks (some NFS mounts) gets a warning, and the manifest check (`_check_unchanged`)
    alone then guards against a concurrent prepare."""
    path = out / LOCK
    fd = _take_lock(out, path)
    try:
        yield
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


def _publish_remote(out: storage.RemotePath, write: Callable[[storage.Location], dict[str, Any]]) -> dict[str, Any]:
    """Publish a new version under the prefix `out` (an object store has no lock: concurrent
    prepares are told apart by the manifest each started from, `_publish`)."""
    _check_replaceable(out)  # again: someone may have written there meanwhile
    return _publish(out, write)


def _publish(out: storage.Location, write: Callable[[storage.Location], dict[str, Any]]) -> dict[str, Any]:
    """Write a new version under `out/v-...`, publish it by writing `out/manifest.json`, then
    delete the versions it replaced. Until the manifest is written the previous dataset stays
    published and whole; on any failure this version is removed again (best effort: what a
    kill or an outage leaves, the next prepare removes as stale)."""
    version = _new_version()
    base = _published_text(out)  # the published dataset this one replaces (None: none)
    stage = "writing"
    try:
        manifest = _in_version(write(out / version), version)
        _check_unchanged(out, base)
        stage = "publishing"
        atomic.write_text(out / MANIFEST, _manifest_text(manifest))
    except BaseException as exc:
        remote = isinstance(out, storage.RemotePath)
        # A manifest upload that failed may still have landed: then its shards must stay.
        if stage == "writing" or not remote:
            _remove_version(out, version)
        if remote and isinstance(exc, OSError) and "AWS Error" in str(exc):
            said = storage.describe(exc, str(out))
            if stage == "writing":
                raise storage.StorageError(f"--out: writing {out} failed, nothing was published there "
                                           f"(the previous dataset, if any, is unchanged): {said}") from exc
            raise storage.StorageError(f"--out: publishing {out}/{MANIFEST} failed; either the previous "
                                       f"dataset or this one is published there, whole: {said}") from exc
        raise
    if _confirm_published(out, manifest, version):
        _remove_stale(out, version, base, _manifest_text(manifest))
    return manifest


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
    are deleted here."""
    remote = isinstance(out, storage.RemotePath)
    if remote:
        keys = [(key, m) for key in _objects(out) if (m := SHARD_KEY.fullmatch(key))]
        versions = {m.group("version") for _, m in keys if m.group("version")}
        for key in [key for key, m in keys if not m.group("version")]:
            (out / key).unlink(missing_ok=True)
    else:
        versions = {p.name for p in out.iterdir() if VERSION.fullmatch(p.name)}
        for split in _unversioned_splits(base):
            shutil.rmtree(out / split, ignore_errors=True)
        atomic.clear_stale_siblings(out / MANIFEST)  # `.manifest.json.tmp-*` of killed prepares
    return sorted(v for v in versions if v != current and (v < current or not remote))


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
