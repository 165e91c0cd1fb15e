"""`rsrefseg prepare`: a dataset as distributed -> validated Parquet shards + manifest."""

from __future__ import annotations

from rsrefseg.datasets.prepare import prepare_dataset


def run_prepare(fmt: str, root: str, out: str, *, skip_invalid: bool = False) -> dict:
    manifest = prepare_dataset(fmt, root, out, skip_invalid=skip_invalid)
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    print(f"[rsrefseg] prepared {out}: {counts}; hash {manifest['content_hash'][:12]}")
    if manifest.get("skipped"):
        print(f"[rsrefseg] skipped {len(manifest['skipped'])} invalid triplets (listed in {out}/manifest.json)")
    return manifest
