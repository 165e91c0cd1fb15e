"""`rsrefseg prepare`: a dataset as distributed -> validated Parquet shards + manifest."""

from __future__ import annotations

from rsrefseg.datasets.imagefiles import DEFAULT_MASK_THRESHOLD, DEFAULT_MAX_PIXELS
from rsrefseg.datasets.prepare import prepare_dataset
from rsrefseg.platform.console import say

LISTED = 3  # skipped samples and warnings shown on the terminal; the manifest has them all


def run_prepare(
    fmt: str, root: str, out: str, *, skip_invalid: bool = False, mask_threshold: int = DEFAULT_MASK_THRESHOLD,
    max_pixels: int = DEFAULT_MAX_PIXELS, keep_non_english: bool | None = None, ray_address: str | None = None,
) -> dict:
    # A progress bar (rate, ETA) on stderr where it is a terminal; a rerun after an interrupt or
    # a kill resumes (datasets.resume) and says what it kept. `ray_address`: decode on that Ray
    # cluster's nodes (datasets.cluster_pool), which must see `root` at the same path.
    manifest = prepare_dataset(fmt, root, out, skip_invalid=skip_invalid, mask_threshold=mask_threshold, max_pixels=max_pixels,
                               keep_non_english=keep_non_english, progress=True, ray_address=ray_address)
    for line in summary_lines(manifest, out):
        say(line)
    return manifest


def summary_lines(manifest: dict, out: str) -> list[str]:
    """What a user compares with the published split sizes, and what was left out or changed."""
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    lines = [f"prepared {out}: {counts}; hash {manifest['content_hash'][:12]}"]
    for split, per in manifest.get("categories", {}).items():
        if per:
            lines.append(f"  {split} by category: " + ", ".join(f"{name} {n}" for name, n in per.items()))
    skipped = [f"id {s['id']!r} ({s['split']}): {s['reason']}" for s in manifest.get("skipped") or []]
    lines += _listed(skipped, f"skipped {len(skipped)} invalid triplet(s) (all listed in {out}/manifest.json under skipped):")
    warnings = manifest.get("warnings") or []
    lines += _listed(warnings, f"kept {len(warnings)} sample(s) with a change (all listed in {out}/manifest.json under warnings):")
    return lines


def _listed(items: list[str], title: str) -> list[str]:
    """The title and the first LISTED items, indented (nothing when there are none)."""
    if not items:
        return []
    more = [f"  ... and {len(items) - LISTED} more"] if len(items) > LISTED else []
    return [title] + [f"  {item}" for item in items[:LISTED]] + more
