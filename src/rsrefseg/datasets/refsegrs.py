"""Reader of RefSegRS as distributed (Yuan et al., "RRSIS", TGRS 2024).

    <root>/images/<id>.tif              512x512 RGB
    <root>/masks/<id>.tif               binary; seen as 0/1 and as 0/255
    <root>/output_phrase_train.txt      one "<id> <phrase...>" per line (also _val, _test)

The same image and mask can repeat under several ids with different phrases. Masks are binarized
by the mask policy of `imagefiles.as_binary_mask`; a sample's category comes from its phrase
(`categories.phrase_category`). The built-in synthetic set is written in this layout, so it goes
through this reader too, with the categories its generator knows.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from .categories import phrase_category
from .imagefiles import DEFAULT_MASK_THRESHOLD, DEFAULT_MAX_PIXELS, check_max_pixels, load_mask, load_rgb
from .triplet import DatasetError, Issue, IssueHandler, Triplet, check_split_name, plain_file_name, report

SPLITS = ("train", "val", "test")
LAYOUT = "images/<id>.tif, masks/<id>.tif, output_phrase_{train,val,test}.txt"


def phrase_file(root: str | Path, split: str) -> Path:
    return Path(root) / f"output_phrase_{split}.txt"


def read_refsegrs(
    root: str | Path,
    *,
    on_issue: IssueHandler = None,
    mask_threshold: int = DEFAULT_MASK_THRESHOLD,
    categorize: Callable[[str], str] = phrase_category,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[Triplet]:
    """Yield one lazy `Triplet` per phrase line, split by split, in file order.

    mask_threshold: 8-bit mask values at or above it are foreground (the mask policy).
    categorize: phrase -> category.
    max_pixels: images and masks whose header declares more pixels are refused before decoding.

    Problems of a single line (not UTF-8, no phrase) go to `on_issue` (None: raise DatasetError).
    A missing folder or phrase file is not a per-sample problem and always raises.
    """
    root, max_pixels = Path(root), check_max_pixels(max_pixels)
    if not root.is_dir():
        raise DatasetError(f"RefSegRS folder not found: {root} (expected {LAYOUT})")
    missing = [str(phrase_file(root, s)) for s in SPLITS if not phrase_file(root, s).is_file()]
    if missing:
        raise DatasetError(f"not a RefSegRS folder: missing {', '.join(missing)} (expected {LAYOUT})")

    for split in SPLITS:
        path = phrase_file(root, split)
        check_split_name(split, where=str(path))  # fixed names today; the check keeps it so
        yielded = 0
        for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
            where = f"{path}:{lineno}"
            found = _parse_line(raw, lineno == 1, split, where)
            if isinstance(found, Issue):
                report(on_issue, found)
            elif found is not None:
                sample_id, phrase = found
                yield _triplet(root, sample_id, phrase, split, where, categorize(phrase), mask_threshold, max_pixels=max_pixels)
                yielded += 1
        if yielded == 0:
            # Reported, not raised: prepare_dataset decides (error, or a warning with skip_invalid).
            report(on_issue, Issue(f"split {split!r} is empty: {path} has no samples", split=split, where=str(path), kind="split"))


def _parse_line(raw: bytes, first: bool, split: str, where: str) -> tuple[str, str] | Issue | None:
    """(id, phrase) of one line of a phrase file, the Issue that leaves it out, or None (blank)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The id is usually plain ASCII even when the phrase is not: recover it so that a
        # skipped line can be listed by id.
        guess = raw.decode("utf-8", errors="replace").split(None, 1)
        return Issue(f"line is not valid UTF-8 (byte {exc.start})", id=guess[0] if guess else None, split=split, where=where)
    if first:
        text = text.lstrip("\ufeff")  # a BOM from Windows editors
    parts = text.strip().split(None, 1)
    if not parts:
        return None  # blank lines (a trailing newline) carry nothing
    sample_id = parts[0]
    phrase = parts[1].strip() if len(parts) > 1 else ""
    if not phrase:
        return Issue("line has an id but no phrase", id=sample_id, split=split, where=where)
    if not plain_file_name(sample_id):  # the id names images/<id>.tif: a name from data, never a path
        return Issue("id is not a plain file name (it names images/<id>.tif)", id=sample_id, split=split, where=where)
    return sample_id, phrase


def _triplet(
    root: Path, sample_id: str, phrase: str, split: str, where: str, category: str, threshold: int, *, max_pixels: int
) -> Triplet:
    image_path = _find(root / "images", sample_id)
    mask_path = _find(root / "masks", sample_id)
    context = f"id {sample_id!r}, {where}"
    return Triplet(
        id=sample_id,
        phrase=phrase,
        split=split,
        image_loader=partial(load_rgb, image_path, context=context, max_pixels=max_pixels),
        mask_loader=partial(load_mask, mask_path, context=context, threshold=threshold, max_pixels=max_pixels),
        where=where,
        image_path=str(image_path),
        mask_path=str(mask_path),
        category=category,
    )


def _find(folder: Path, sample_id: str) -> Path:
    """`<id>.tif`, or `<id>.tiff` when only that exists (the loader reports a missing file)."""
    path = folder / f"{sample_id}.tif"
    if not path.exists() and (folder / f"{sample_id}.tiff").exists():
        return folder / f"{sample_id}.tiff"
    return path
