"""Reader of RemoteSAM-270K, in the REFER layout it ships in (`refer`).

    <root>/JPEGImages/<file_name>
    <root>/Annotations/                    (not read: the masks are in instances.json)
    <root>/refs(unc).p                     refs: split, ann_id, file_name, image_id, category_id,
                                           sentences [{sent}]; the code's default name
                                           refs(unc)_RemoteSAM.p is accepted too
    <root>/instances.json                  COCO: an annotation's segmentation is a list of RLEs,
                                           whose union is the mask

Splits train, val, testA, testB; 297 categories (the ref's `category_id`, named by the
instances' categories). The quirks: "one-to-zero" samples have all-zero masks (kept, as such;
an empty segmentation is one too); an image listed as .jpg may be a .png on disk, and the
reverse: the file with the same stem is used. `keep_non_english` keeps or leaves out Chinese or
mixed expressions, counted in a note either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .imagefiles import DEFAULT_MAX_PIXELS, check_max_pixels
from .language import LanguageFilter
from .refer import Layout, Rules, coco_category, read_refer
from .triplet import DatasetError, IssueHandler, Triplet

REFS_FILES = ("refs(unc).p", "refs(unc)_RemoteSAM.p")
INSTANCES_FILE = "instances.json"
LAYOUT_HELP = "expected refs(unc).p (or refs(unc)_RemoteSAM.p), instances.json and JPEGImages/ side by side"


def locate(root: str | Path) -> Layout:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"RemoteSAM-270K folder not found: {root} ({LAYOUT_HELP})")
    refs = next((root / name for name in REFS_FILES if (root / name).is_file()), None)
    if refs is None:
        raise DatasetError(f"not a RemoteSAM-270K folder: no {' or '.join(REFS_FILES)} in {root} ({LAYOUT_HELP})")
    if not (root / INSTANCES_FILE).is_file():
        raise DatasetError(f"not a RemoteSAM-270K folder: {refs} is there but {root / INSTANCES_FILE} is missing")
    if not (root / "JPEGImages").is_dir():
        raise DatasetError(f"RemoteSAM-270K images not found: {root / 'JPEGImages'} is not a folder ({LAYOUT_HELP})")
    return Layout(refs, root / INSTANCES_FILE, root / "JPEGImages")


def read_remotesam(
    root: str | Path, *, on_issue: IssueHandler = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_non_english: bool = False, **_mask_policy,
) -> Iterator[Triplet]:
    """Yield one lazy `Triplet` per sentence of every ref, in the order of the refs file. RLE and
    polygon masks are binary: the mask policy does not apply (accepted and ignored)."""
    layout, max_pixels = locate(root), check_max_pixels(max_pixels)
    language = LanguageFilter(keep_non_english)
    rules = Rules(category=coco_category, keep_phrase=language, find_image=True, allow_empty=True)
    yield from read_refer(layout, rules, on_issue=on_issue, max_pixels=max_pixels)
    language.report(on_issue, str(layout.refs))
