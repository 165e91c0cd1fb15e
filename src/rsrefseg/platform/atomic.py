"""Write-then-rename: the one way this project writes a file or folder that a reader may expect
to be complete (a run's info, a checkpoint, a mask, a table).

Everything is built under a hidden sibling name (same filesystem, so the rename is atomic) and
renamed over the target at the end. A reader sees the old version or the new one, never half of
one; an error inside the block removes the sibling.

The sibling's name says who made it: `.NAME.tmp-OWNER-PID-RANDOM` (a folder or file being
written) or `.NAME.old-OWNER-PID-RANDOM` (the previous folder, moved aside for the swap), where
OWNER identifies this machine and PID namespace and PID is the writing process. A process killed
outright (SIGKILL, power loss) cannot remove its siblings, so `atomic_dir` clears those it finds
beside its target from earlier runs, by this rule (`is_stale`):
  * made on this machine (same OWNER) by a process that no longer runs: stale at once;
  * otherwise (another machine sharing the filesystem, where a PID says nothing, or a name from
    before owners were recorded): stale only once nothing in it changed for STALE_AFTER_S
    (6 hours), far longer than any folder here takes to write.
A sibling of a live process, or a fresh one of another machine, is someone's write in progress
and is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

STALE_AFTER_S = 6 * 3600  # a sibling of another machine, untouched this long, is abandoned


def _owner() -> str:
    """8 hex digits naming this machine (host name and boot) and PID namespace: a PID is only
    meaningful to processes that share all three."""
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else Path(source).read_text().strip())
        except OSError:
            parts.append("")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


OWNER = _owner()


def _sibling(target: Path, kind: str, pid: Optional[int] = None) -> Path:
    pid = os.getpid() if pid is None else pid
    return target.parent / f".{target.name}.{kind}-{OWNER}-{pid}-{uuid.uuid4().hex[:8]}"


def _sibling_pattern(target: Path) -> re.Pattern:
    """The names of `target`'s siblings: groups (owner, pid), both None for the older, bare names
    (`.NAME.tmp-RANDOM`)."""
    return re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(?:([0-9a-f]{{8}})-(\d+)-)?[0-9a-f]{{8}}")


def process_running(pid: int) -> bool:
    """Whether process `pid` of this host still runs (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


def _last_change(path: Path) -> float:
    """The newest modification time of `path` and of what it directly holds (a file written
    into a folder changes the file's time, not the folder's)."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        with os.scandir(path) as entries:
            times += [entry.stat(follow_symlinks=False).st_mtime for entry in entries]
    return max(times)


def is_stale(sibling: Path, owner: Optional[str], pid: Optional[int], now: Optional[float] = None) -> bool:
    """Whether a staging sibling is left over from an earlier run (the rule in the module doc)."""
    return owner_gone(owner, pid, lambda: _last_change(sibling), now)


def owner_gone(owner: Optional[str], pid: Optional[int], last_change: Callable[[], float],
               now: Optional[float] = None) -> bool:
    """The module doc's rule for anything staged by (OWNER, pid), wherever it lies (a prepare's
    staging in an object store too): its process of this machine no longer runs, or, made
    elsewhere, nothing in it changed (`last_change()`, a time stamp) for STALE_AFTER_S."""
    if owner == OWNER and pid is not None:
        return pid != os.getpid() and not process_running(pid)
    return (time.time() if now is None else now) - last_change() > STALE_AFTER_S


def clear_stale_siblings(target: str | os.PathLike) -> list[Path]:
    """Remove the stale `.NAME.tmp-*` / `.NAME.old-*` siblings of `target`; return them. Best
    effort: one that cannot be inspected or removed is left (and logged)."""
    target = Path(target)
    pattern, removed = _sibling_pattern(target), []
    try:
        entries = [e for e in os.scandir(target.parent) if e.name.startswith(f".{target.name}.")]
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match:
            continue
        path = Path(entry.path)
        try:
            if not is_stale(path, match.group(1), int(match.group(2)) if match.group(2) else None):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue  # removed meanwhile by someone else
        except OSError as exc:
            log.warning("could not remove the stale %s: %s", path, exc)
    return removed


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; the caller writes it (any writer: PIL, pyarrow,
    rasterio, matplotlib, with an explicit format, since the name has no real suffix); on a
    clean exit it replaces `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(target, data: bytes):
    """`target`: a local path, or a `storage.RemotePath` (an object store replaces one object
    whole, so a reader sees the old version or the new one there too)."""
    if hasattr(target, "fs"):
        target.write_bytes(data)
        return target
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target, text: str):
    return write_bytes(target, text.encode("utf-8"))


def write_json(target, data: Any):
    return write_text(target, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on a clean exit it replaces `target` (an
    existing one is moved aside first and removed after; the caller decides whether it may go).
    Stale siblings of earlier, killed runs are cleared first (module doc)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_siblings(target)
    staging = _sibling(target, "tmp")
    staging.mkdir()
    try:
        yield staging
        _swap(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _swap(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`. A folder cannot be renamed over a non-empty one, so an
    existing `target` is moved aside first and removed after. A failure or an interrupt between
    the two renames puts the old one back: `target` is never left missing."""
    old = _sibling(target, "old")
    try:
        if os.path.lexists(target):
            os.replace(target, old)
        os.replace(staging, target)
    finally:
        if os.path.lexists(old) and not os.path.lexists(target):
            os.replace(old, target)
    shutil.rmtree(old, ignore_errors=True)


def copy_dir(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy the local folder `src` to the local folder `target`, atomically (`storage.copy_dir`
    publishes to an object store as well)."""
    with atomic_dir(target) as staging:
        shutil.copytree(src, staging, dirs_exist_ok=True)
    return Path(target)
