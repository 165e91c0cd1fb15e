"""Resuming a prepare that was interrupted or killed: its staging, found again by the next prepare
with the same arguments, and the journal of what it had finished.

A prepare writes its new version under `<out>/v-TIME-RANDOM/` (`prepare.py`) and keeps a journal
inside that version, beside the shards, in a local folder and under an `s3://` prefix alike:

    v-.../.resume/staging.json               the fingerprint and the owner (machine, pid): first
    v-.../.resume/validated.json             the validation's outcome (samples left out, notes)
    v-.../.resume/<split>/part-NNNNN.json    one per finished shard, written once the shard file
                                             is whole: its rows, size and SHA-256, largest image,
                                             and its samples' digests (the content hash's lines)

Each record is written whole (write-then-rename locally, one PUT on a store) after what it
describes, so a kill at any moment leaves records only of whole files; a shard's SHA-256 is taken
from the bytes as they are written (no second read, no download from the store).

The fingerprint is a SHA-256 of everything the shards depend on: the format, the resolved root,
the reader's options, skip_invalid, the mask threshold, the pixel cap, the shard bounds, the
schema version and the shard-writing settings (`prepare._Request.settings`), JOURNAL_VERSION, the
versions of the libraries that decode and write (LIBRARIES), and the source listing: every file
under the root and every file a sample names (wherever it lies: RRSIS-D's images sit beside a
root given as its `rrsisd/` folder), each with its size, mtime and ctime in nanoseconds (ctime
changes on any write, and nothing resets it). Not the thread count, which changes no byte.

The next prepare to the same `out` whose fingerprint is the same takes a staging over once its
owner is gone: locally, any (prepare's lock says no other prepare writes there); on an object
store, by the rule of `atomic.owner_gone` (its process on this machine no longer runs; made on
another machine, untouched for 6 hours), so a staging a live prepare is writing is never taken
over nor deleted. It keeps the validation's outcome (nothing is decoded to validate again) and,
per split, the finished shards from part-00000 on whose file has the recorded size and SHA-256
and whose samples are the ones due there; the first that fails the check and every later one are
written again. Rows are sorted by id and shard bounds follow from the rows and their bytes, so
the shards written are byte for byte those an uninterrupted prepare writes, and the content hash
(of the samples' digests, kept in the records) is the same. A staging whose fingerprint differs
(the source changed, other arguments) is never resumed: it is deleted, once its owner is gone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from rsrefseg.platform import atomic, storage

from .triplet import Issue, Triplet

log = logging.getLogger(__name__)

VERSION = re.compile(r"v-\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}")
JOURNAL = ".resume"
STAGING = "staging.json"
VALIDATED = "validated.json"
SHARD_RECORD = re.compile(r"(?P<split>[^/]+)/part-(?P<index>\d{5})\.json")
# Bump when what prepare writes into a shard changes while SCHEMA_VERSION does not: stagings of
# the older code then never match.
JOURNAL_VERSION = 1
LIBRARIES = ("pyarrow", "pillow", "numpy", "tifffile", "pycocotools", "imagecodecs")
READ_CHUNK = 8 << 20

# The stagings this process writes now ("out|version"). One whose owner is this very process is
# gone unless listed here: a prepare interrupted in a notebook, run again, resumes its own.
_WRITING: set[str] = set()


@dataclass
class Staging:
    """A version being written under `out`: its name, fingerprint, and the finished shards kept
    from an earlier prepare (split -> their records, in order)."""

    out: storage.Location
    version: str
    fingerprint: str
    kept: dict[str, list[dict]] = field(default_factory=dict)

    def journal(self, *parts: str) -> storage.Location:
        return self.out / self.version / JOURNAL / "/".join(parts)

    def kept_rows(self, split: str) -> int:
        return sum(r["rows"] for r in self.kept.get(split, []))


@dataclass
class Validation:
    """What validating the pixels found: the samples left out and the notes (samples kept with a
    change). `recorded`: taken from a staging's journal rather than found now."""

    issues: list[Issue]
    notes: list[Issue]
    recorded: bool = False


# --------------------------------------------------------------------------------------------
# The fingerprint


def fingerprint(settings: dict[str, Any], root: Path, triplets: Iterable[Triplet], *, skip: Optional[Path] = None) -> str:
    """The fingerprint of a prepare (module doc). `skip`: a folder under `root` left out of the
    listing (the output, when a user puts it inside the dataset)."""
    head = {"settings": settings, "journal": JOURNAL_VERSION, "libraries": _versions()}
    h = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode())
    for entry in _listing(root, triplets, skip):
        h.update(json.dumps(entry).encode() + b"\n")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = ""
    return found


def _listing(root: Path, triplets: Iterable[Triplet], skip: Optional[Path]) -> list[list]:
    """[path, size, mtime_ns, ctime_ns] of every file under `root` and every file a sample
    names, sorted ([path, None, None, None] for one that is missing). A name with a '#' (RRSIS-D's
    `instances.json#annotation=12`) is listed as it is and as the part before the '#'."""
    paths = set(_walk(root, skip))
    for t in triplets:
        for named in (t.image_path, t.mask_path):
            if named:
                paths.update(os.path.abspath(p) for p in {str(named), str(named).split("#", 1)[0]})
    listing = []
    for path in sorted(paths):
        try:
            st = os.stat(path)
            listing.append([path, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
        except OSError:
            listing.append([path, None, None, None])
    return listing


def _walk(root: Path, skip: Optional[Path]) -> Iterator[str]:
    """Every file under `root`, links followed (each folder once), `skip` left out."""
    seen: set[tuple[int, int]] = set()
    skipped = os.path.realpath(skip) if skip is not None else None
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen or os.path.realpath(folder) == skipped:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        yield from (os.path.abspath(os.path.join(folder, name)) for name in files)


# --------------------------------------------------------------------------------------------
# Finding, taking over and removing stagings


def find(out: storage.Location, fingerprint_: str, published: set[str], *, locked: bool) -> Optional[str]:
    """The newest unpublished version under `out` whose staging has `fingerprint_` and whose
    owner is gone (None: none)."""
    found = None
    for version, newest in sorted(_versions_under(out).items()):
        if version in published:
            continue
        record = _read_json(out / version / JOURNAL / STAGING)
        if record and record.get("fingerprint") == fingerprint_ and _owner_gone(out, version, record, newest, locked):
            found = version
    return found


def abandoned(out: storage.Location, keep: set[str], *, locked: bool) -> list[str]:
    """The versions under `out`, other than `keep`, that no prepare will resume or publish: with
    prepare's lock held, every one; on a store, those whose staging's owner is gone (a version
    without a staging record is an older prepare's: `prepare._stale_versions` sees to it)."""
    gone = []
    for version, newest in sorted(_versions_under(out).items()):
        if version in keep:
            continue
        record = None if locked else _read_json(out / version / JOURNAL / STAGING)
        if locked or (record is not None and _owner_gone(out, version, record, newest, False)):
            gone.append(version)
    return gone


def _owner_gone(out: storage.Location, version: str, record: dict, newest: float, locked: bool) -> bool:
    if locked:
        return True
    owner, pid = record.get("owner"), record.get("pid")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
    if owner == atomic.OWNER and pid == os.getpid():
        return _key(out, version) not in _WRITING
    return atomic.owner_gone(owner, pid, lambda: newest)


def claim(out: storage.Location, version: str, fingerprint_: str) -> Staging:
    """Make `version` this process's staging (its record names this process as the owner)."""
    _WRITING.add(_key(out, version))
    staging = Staging(out, version, fingerprint_)
    atomic.write_json(staging.journal(STAGING), {"fingerprint": fingerprint_, "owner": atomic.OWNER, "pid": os.getpid(),
                                                 "journal": JOURNAL_VERSION})
    return staging


def release(staging: Staging) -> None:
    """This process no longer writes the staging (published, failed or interrupted)."""
    _WRITING.discard(_key(staging.out, staging.version))


def drop_journal(out: storage.Location, version: str) -> None:
    """Remove a published version's journal, best effort (what is left is removed with the version)."""
    where = out / version / JOURNAL
    try:
        if isinstance(where, storage.RemotePath):
            where.fs.delete_dir(where.path)
        else:
            shutil.rmtree(where)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s (removed with its version later): %s", where, exc)


def _key(out: storage.Location, version: str) -> str:
    return f"{out if isinstance(out, storage.RemotePath) else Path(out).resolve()}|{version}"


def _versions_under(out: storage.Location) -> dict[str, float]:
    """Each version under `out` holding files -> the newest modification time (seconds) in it."""
    newest: dict[str, float] = {}
    for relative, mtime in _entries(out):
        top = relative.split("/", 1)[0]
        if VERSION.fullmatch(top):
            newest[top] = max(newest.get(top, 0.0), mtime)
    return newest


def _entries(where: storage.Location) -> list[tuple[str, float]]:
    """(path relative to `where`, modification time) of every file under `where`."""
    if isinstance(where, storage.RemotePath):
        from pyarrow import fs

        found = where.fs.get_file_info(fs.FileSelector(where.path, recursive=True, allow_not_found=True))
        return [(i.path[len(where.path) + 1:], i.mtime.timestamp() if i.mtime else 0.0)
                for i in found if i.type == fs.FileType.File]
    entries = []
    for path in where.rglob("*") if where.is_dir() else ():
        try:
            if path.is_file():
                entries.append((path.relative_to(where).as_posix(), path.stat().st_mtime))
        except FileNotFoundError:
            continue  # removed meanwhile
    return entries


def _read_json(where: storage.Location) -> Optional[dict]:
    """A journal record, None when it is missing or not a JSON object."""
    try:
        data = json.loads(where.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------
# The validation's outcome


def save_validation(staging: Staging, validation: Validation) -> None:
    atomic.write_json(staging.journal(VALIDATED), {
        "fingerprint": staging.fingerprint,
        "issues": [dataclasses.asdict(i) for i in validation.issues],
        "notes": [dataclasses.asdict(i) for i in validation.notes],
    })


def load_validation(out: storage.Location, version: str, fingerprint_: str) -> Optional[Validation]:
    """The validation recorded in a staging, None when there is none (or it is not this one's)."""
    record = _read_json(out / version / JOURNAL / VALIDATED)
    if not record or record.get("fingerprint") != fingerprint_:
        return None
    try:
        return Validation([Issue(**d) for d in record["issues"]], [Issue(**d) for d in record["notes"]], recorded=True)
    except (KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# Finished shards


def shard_record(path: str, rows: int, size: int, sha256: str, largest: list[int], digests: list[str]) -> dict:
    return {"path": path, "rows": rows, "size": size, "sha256": sha256, "largest": largest, "digests": digests}


def record_shard(staging: Staging, split: str, index: int, record: dict) -> None:
    """Journal a finished shard: call once its file is whole (closed, uploaded)."""
    atomic.write_json(staging.journal(split, f"part-{index:05d}.json"), record)


def keep_finished(staging: Staging, by_split: dict[str, list[Triplet]], workers: int) -> dict[str, list[dict]]:
    """Split -> the finished shards of the staging that are kept (module doc): their files are
    checked, `workers` at a time. The records of the others are removed."""
    records = _shard_records(staging)
    checks = [(split, index, record) for split, listed in records.items() for index, record in listed.items()]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        intact = dict(zip([(s, i) for s, i, _ in checks], pool.map(lambda c: _intact(staging, *c), checks)))
    kept: dict[str, list[dict]] = {}
    for split, listed in records.items():
        items, prefix, start = by_split.get(split, []), [], 0
        while len(prefix) in listed and intact[(split, len(prefix))]:
            record = listed[len(prefix)]
            if [d.split("\t", 1)[0] for d in record["digests"]] != [t.id for t in items[start:start + record["rows"]]]:
                break  # not the samples due there
            prefix.append(record)
            start += record["rows"]
        kept[split] = prefix
        for index in sorted(i for i in listed if i >= len(prefix)):
            _unlink(staging.journal(split, f"part-{index:05d}.json"))
    staging.kept = kept
    return kept


def _shard_records(staging: Staging) -> dict[str, dict[int, dict]]:
    """split -> shard index -> its record, for the records that are well formed."""
    records: dict[str, dict[int, dict]] = {}
    for relative, _ in _entries(staging.out / staging.version / JOURNAL):
        match = SHARD_RECORD.fullmatch(relative)
        if not match:
            continue
        split, index = match.group("split"), int(match.group("index"))
        record = _read_json(staging.journal(relative))
        if record is not None and _well_formed(record, split, index):
            records.setdefault(split, {})[index] = record
    return records


def _well_formed(record: dict, split: str, index: int) -> bool:
    try:
        return (record["path"] == f"{split}/part-{index:05d}.parquet" and int(record["rows"]) > 0
                and len(record["digests"]) == record["rows"] and all(isinstance(d, str) for d in record["digests"])
                and isinstance(record["sha256"], str) and isinstance(record["size"], int)
                and len(record["largest"]) == 2 and all(isinstance(v, int) for v in record["largest"]))
    except (KeyError, TypeError, ValueError):
        return False


def _intact(staging: Staging, split: str, index: int, record: dict) -> bool:
    """Whether the shard file has the recorded size and SHA-256."""
    where = staging.out / staging.version / record["path"]
    try:
        size, digest = file_sha256(where)
    except OSError:
        return False
    return size == record["size"] and digest == record["sha256"]


def file_sha256(where: storage.Location) -> tuple[int, str]:
    """(size, SHA-256) of a local file or an object, read in chunks."""
    h, size = hashlib.sha256(), 0
    opened = where.fs.open_input_stream(where.path) if isinstance(where, storage.RemotePath) else open(where, "rb")
    with opened as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _unlink(where: storage.Location) -> None:
    try:
        where.unlink()
    except FileNotFoundError:
        pass


class HashingSink:
    """A writable file object that hashes what passes through it to `raw` (a pyarrow output
    stream, local or to a store): a shard's SHA-256 as it is written."""

    def __init__(self, raw):
        self.raw, self.size, self._hash = raw, 0, hashlib.sha256()

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
