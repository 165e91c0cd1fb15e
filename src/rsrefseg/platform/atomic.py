"""Write-then-rename: the one way this project writes a file or folder that a reader may expect
to be complete (a run's info, a checkpoint, a prepared dataset, a mask, a table).

Everything is built under a hidden sibling name (`.NAME.tmp-XXXXXXXX`, same filesystem, so the
rename is atomic) and renamed over the target at the end. A reader sees the old version or the
new one, never half of one; a crash leaves at most a hidden `.NAME.tmp-*` behind, and an error
inside the block removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


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
    existing one is moved aside first and removed after; the caller decides whether it may go)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    staging.mkdir()
    try:
        yield staging
        old = None
        if target.exists():
            old = _sibling(target, "old")
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def copy_dir(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy the local folder `src` to the local folder `target`, atomically (`storage.copy_dir`
    publishes to an object store as well)."""
    with atomic_dir(target) as staging:
        shutil.copytree(src, staging, dirs_exist_ok=True)
    return Path(target)
