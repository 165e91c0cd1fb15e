"""`rsrefseg prepare`: validate a dataset, then write it as Parquet shards with a manifest.

    <out>/manifest.json
    <out>/<split>/part-00000.parquet, part-00001.parquet, ...

Validation comes first and covers every sample (a missing or unreadable file, an image that is
not RGB, an image/mask size mismatch, a mask that is not binary, a line without a phrase, a
duplicate id, an id in two splits, a non-UTF-8 line, an empty split). By default any problem
raises one `DatasetError` listing them all and nothing is written; with `skip_invalid` the bad
samples are left out and listed in the manifest, but a split left empty is still an error. A
sample whose format resizes masks (RRSIS-D) is kept with its mask fitted to the image, and listed
in the manifest's warnings. Validation decodes every sample, then writing
decodes it again: more time than one pass, in exchange for never touching the disk when the
input is bad. Pixels are stored raw under Parquet compression (`shard_codec`).

Output is atomic. A local `out`: shards are written into a staging folder beside it and renamed
into place, so `out` is either the previous complete dataset or the new complete one. Object
storage (`s3://BUCKET/PREFIX`) has no rename, so there manifest.json is the publish marker: the
shards stream straight to the store (no local copy of the dataset), the manifest is written
last, and a reader sees a complete dataset or "not a prepared dataset", never half of one.
Replacing a prepared dataset there unpublishes it first (its manifest is removed), then writes
the new shards and manifest, then deletes the old shards the new manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rsrefseg.platform import storage
from rsrefseg.platform.atomic import atomic_dir

from .fiftyone import read_fiftyone
from .imagefiles import DEFAULT_MASK_THRESHOLD
from .refsegrs import read_refsegrs
from .rrsisd import read_rrsisd
from .shard_codec import ENCODING, PIXEL_COMPRESSION, encode_image, encode_mask
from .synthetic import read_synthetic
from .triplet import DatasetError, Issue, Triplet

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: the category column; 3: raw pixels (shard_codec) instead of PNG
MANIFEST = "manifest.json"
EXPECTED_SPLITS = ("train", "val", "test")

# The readers, by the format names of `rsrefseg prepare --format`. "synthetic" is a folder that
# synthetic.generate() wrote, which is the RefSegRS layout with categories the generator knows.
READERS: dict[str, Callable[..., Iterator[Triplet]]] = {
    "refsegrs": read_refsegrs,
    "synthetic": read_synthetic,
    "rrsisd": read_rrsisd,
    "fiftyone": read_fiftyone,
}

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),  # what the phrase refers to; "" = unknown
        pa.field("image", pa.binary(), nullable=False),  # raw RGB pixels (shard_codec)
        pa.field("mask", pa.binary(), nullable=False),  # packed bits (shard_codec)
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),  # position in the split (sorted by id)
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
# The keys prepare writes under a dataset prefix in object storage (besides manifest.json): what
# it may delete there (stale shards of a replaced dataset, the shards of a failed upload).
SHARD_KEY = re.compile(r"[^/]+/part-\d{5}\.parquet")


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
) -> dict[str, Any]:
    """Validate the dataset at `root` (format `fmt`) and write it to `out`; return the manifest.

    fmt: one of READERS ("refsegrs", "rrsisd", "fiftyone", "synthetic").
    skip_invalid: leave invalid samples out (listed in manifest["skipped"]) instead of raising;
        a split left empty still raises.
    workers: threads decoding and encoding images (default: the CPU count, at most 8).
    mask_threshold: 8-bit mask values at or above it are foreground (README "Mask policy").
    """
    _check_arguments(fmt, mask_threshold)
    root, out = Path(root), storage.location(out)
    if isinstance(out, storage.RemotePath):
        # Before any decoding: a missing bucket or a key that may not write fails in a second.
        storage.check_writable("--out", str(out))
    _check_replaceable(out)
    workers = workers or min(8, os.cpu_count() or 1)

    # Every sample is validated before anything is written: bad input never touches the output.
    valid, issues, notes = _validate(fmt, root, workers, skip_invalid=skip_invalid, mask_threshold=mask_threshold)

    # Write (into staging, or straight to the store), then publish.
    by_split = _group_by_split(valid)

    def write(target: storage.Location) -> dict[str, Any]:
        """The shards under `target` (a folder or a prefix), and the manifest that lists them."""
        shards, largest, digests = _write_shards(target, by_split, workers, rows_per_shard, max_shard_bytes)
        return _manifest(
            fmt, root, by_split, shards, largest, digests, mask_threshold=mask_threshold, issues=issues, notes=notes
        )

    if isinstance(out, storage.RemotePath):
        manifest = _publish_remote(out, write)
    else:
        manifest = _publish_local(out, write)
    log.info("prepared %s: %s", out, manifest["counts"])
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
    return manifest


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
    fmt: str, root: Path, workers: int, *, skip_invalid: bool, mask_threshold: int
) -> tuple[list[Triplet], list[Issue], list[Issue]]:
    """The samples to write, the problems found (the skipped samples) and the notes (samples kept
    with a change). Raises one DatasetError listing every problem unless `skip_invalid` may skip
    them all; a split left empty raises regardless."""
    # 1. Metadata: every declared sample, and the problems visible without pixels.
    issues: list[Issue] = []
    triplets = list(READERS[fmt](root, on_issue=issues.append, mask_threshold=mask_threshold))
    triplets = _drop_bad_ids(triplets, issues)

    # 2. Pixels: decode every sample once.
    valid, notes = _check_pixels(triplets, issues, workers)

    _check_empty_splits(valid, triplets, issues, root)
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


def _check_empty_splits(valid: list[Triplet], declared: list[Triplet], issues: list[Issue], root: Path) -> None:
    """Every expected split must have samples. A reader may already have named the empty split
    (with its file); otherwise say so here."""
    have = {t.split for t in valid}
    already = {i.split for i in issues if i.kind == "split"}
    for split in EXPECTED_SPLITS:
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
    every_split = f"A prepared dataset needs samples in every split ({', '.join(EXPECTED_SPLITS)})."
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


def _encode(t: Triplet) -> tuple[bytes, bytes, int, int, str]:
    image, mask, _ = load_pair(t)
    digest = "\t".join([t.id, t.phrase, t.split, t.category, _array_digest(image), _array_digest(np.packbits(mask), mask.shape)])
    return encode_image(image), encode_mask(mask), image.shape[0], image.shape[1], digest


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
    (target / split).mkdir()  # an object store has no folders: nothing to do there
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
        for index, (t, (image, mask, height, width, digest)) in enumerate(zip(items, bounded_map(pool, _encode, items, window))):
            if writer is not None and (shard_rows >= rows_per_shard or shard_bytes + len(image) + len(mask) > max_bytes):
                close_shard()
            if writer is None:
                path = f"{split}/part-{len(shards):05d}.parquet"
                writer = _open_shard(target, path)
                shards.append({"path": path, "rows": 0})
            rows.append((t.id, t.phrase, t.split, t.category, image, mask, height, width, index))
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
        use_dictionary=["phrase", "split", "category", "image", "mask"],
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
    return list(EXPECTED_SPLITS) + sorted(s for s in by_split if s not in EXPECTED_SPLITS)


# --------------------------------------------------------------------------------------------
# The output folder


def _check_replaceable(out: storage.Location) -> None:
    """Replace only what prepare made (a folder or prefix with manifest.json) or an empty one."""
    if not out.exists():
        return
    remote = isinstance(out, storage.RemotePath)
    if out.is_dir() and ((out / MANIFEST).is_file() or not (_objects(out) if remote else any(out.iterdir()))):
        return
    interrupted = ""
    if remote:
        interrupted = f" (a prepare that was killed while uploading leaves such a prefix: `aws s3 rm --recursive {out}`)"
    raise DatasetError(
        f"refusing to write to {out}: it exists and is not a prepared dataset (no {MANIFEST}); "
        f"choose another output folder or remove it{interrupted}"
    )


def _publish_local(out: Path, write: Callable[[storage.Location], dict[str, Any]]) -> dict[str, Any]:
    """Write the dataset into a staging folder beside `out`, then rename it into place: `out` is
    the previous complete dataset or the new complete one, never half of either."""
    with atomic_dir(out) as staging:
        manifest = write(staging)
        (staging / MANIFEST).write_text(_manifest_text(manifest), encoding="utf-8")
        _check_replaceable(out)  # again: someone may have created it meanwhile
    return manifest


def _publish_remote(out: storage.RemotePath, write: Callable[[storage.Location], dict[str, Any]]) -> dict[str, Any]:
    """Write the dataset under the prefix `out`, publishing it by its manifest, written last.

    A previous dataset there is unpublished first (its manifest removed: readers then see "not
    a prepared dataset" rather than old shards mixed with new ones), and its shards that the new
    manifest does not list are deleted once the new one is published. A failure removes what
    was written (the prefix then holds no dataset, and prepare can run again)."""
    _check_replaceable(out)  # again: someone may have written there meanwhile
    manifest_path = out / MANIFEST
    try:
        manifest_path.unlink(missing_ok=True)
        manifest = write(out)
        manifest_path.write_text(_manifest_text(manifest))
    except BaseException as exc:
        _delete_shards(out, keep=set(), manifest_too=True)
        if isinstance(exc, OSError) and "AWS Error" in str(exc):
            raise storage.StorageError(
                f"--out: writing {out} failed, nothing was published there: {storage.describe(exc, str(out))}"
            ) from exc
        raise
    _delete_shards(out, keep={s["path"] for shards in manifest["shards"].values() for s in shards})
    return manifest


def _objects(out: storage.RemotePath) -> list[str]:
    """The objects under the prefix `out` (keys relative to it), without the empty "folder/"
    markers pyarrow's S3 filesystem leaves where it deleted a folder's last object: a prefix
    holding only markers holds nothing."""
    from pyarrow import fs

    found = out.fs.get_file_info(fs.FileSelector(out.path, recursive=True, allow_not_found=True))
    return [i.path[len(out.path) + 1:] for i in found if i.type == fs.FileType.File]


def _delete_shards(out: storage.RemotePath, *, keep: set[str], manifest_too: bool = False) -> None:
    """Delete the shard objects under `out` that are not in `keep` (paths relative to `out`),
    and the manifest with `manifest_too`. Best effort: what cannot be deleted is logged."""
    try:
        if manifest_too:
            (out / MANIFEST).unlink(missing_ok=True)
        for relative in _objects(out):
            if SHARD_KEY.fullmatch(relative) and relative not in keep:
                (out / relative).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not delete old or partial shards under %s: %s", out, storage.describe(exc, str(out)))


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
