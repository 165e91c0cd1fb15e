"""Write-then-rename for output folders, shared by `prepare` and `synthetic.generate`.

A folder is built under a hidden staging name beside its destination (same filesystem, so the
rename is atomic) and swapped in at the end; readers never see a half-written folder, and a crash
leaves at most a hidden `.name.staging-*` folder behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`, replacing an existing `out` (the caller checked it may go)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
