"""Reader of RRSIS-D (Liu et al., RMSIN, CVPR 2024), in the REFER layout it ships in.

The root as downloaded (RMSIN's README):

    <root>/rrsisd/refs(unc).p                 pickled list of refs: ref_id, ann_id, image_id,
                                              split, category_id, sentences [{raw, sent, ...}]
    <root>/rrsisd/instances.json              COCO-style: images [{id, file_name, height, width}],
                                              annotations [{id, image_id, categories_id,
                                              segmentation: [{size, counts}]}], categories
    <root>/images/rrsisd/JPEGImages/<file_name>

The `rrsisd/` folder itself (images then at ../images/rrsisd/JPEGImages) and a flat folder (refs,
instances.json and JPEGImages/ side by side) are accepted too. Every COCO segmentation form
decodes: a compressed or uncompressed RLE, a list of RLEs (the release wraps its one RLE in a
list), polygons. Some release JPEGs are a few pixels off the 800x800 of their RLE: such masks are
resized to the image (nearest), as the authors' loaders do, and reported by prepare; a mask
further off its image, or over the pixel cap, is refused before it is decoded.

One triplet per (ref, sentence), id f"{ref_id}_{sentence_index}"; its category is the
annotation's `categories_id` (the ref's `category_id` if absent) named by `categories`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .imagefiles import DEFAULT_MAX_PIXELS, check_max_pixels
from .refer import Layout, Rules, Tables, read_refer
from .triplet import DatasetError, IssueHandler, Triplet

REFS_FILE = "refs(unc).p"
INSTANCES_FILE = "instances.json"
# (folder of the two metadata files, image folders to try), both relative to the root the user gives.
LAYOUTS = (
    ("rrsisd", ("images/rrsisd/JPEGImages",)),  # the root as downloaded
    (".", ("../images/rrsisd/JPEGImages", "JPEGImages", "images/rrsisd/JPEGImages", "images/JPEGImages")),
)
LAYOUT_HELP = (
    "expected <root>/rrsisd/refs(unc).p, <root>/rrsisd/instances.json and "
    "<root>/images/rrsisd/JPEGImages/ (the layout as downloaded), or refs(unc).p, instances.json "
    "and JPEGImages/ side by side"
)

def locate(root: str | Path) -> Layout:
    """Where the refs, the instances and the images of the RRSIS-D copy at `root` are."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"RRSIS-D folder not found: {root} ({LAYOUT_HELP})")
    for meta, image_dirs in LAYOUTS:
        folder = root / meta
        refs = folder / REFS_FILE
        if not refs.is_file():
            continue
        instances = folder / INSTANCES_FILE
        if not instances.is_file():
            raise DatasetError(f"not an RRSIS-D folder: {refs} is there but {instances} is missing")
        tried = [(root / d).resolve() for d in image_dirs]
        images = next((d for d in tried if d.is_dir()), None)
        if images is None:
            raise DatasetError(f"RRSIS-D images not found: none of {', '.join(map(str, tried))} is a folder ({LAYOUT_HELP})")
        return Layout(refs, instances, images)
    raise DatasetError(f"not an RRSIS-D folder: no {REFS_FILE} in {root} or {root / 'rrsisd'} ({LAYOUT_HELP})")


def read_rrsisd(
    root: str | Path, *, on_issue: IssueHandler = None, max_pixels: int = DEFAULT_MAX_PIXELS, **_mask_policy
) -> Iterator[Triplet]:
    """Yield one lazy `Triplet` per sentence of every ref, in the order of the refs file.

    max_pixels: an image whose header, or a mask whose RLE, declares more pixels is refused
    before decoding.
    RLE and polygon masks are binary by construction, so the mask policy of prepare does not
    apply here (accepted and ignored).
    """
    layout = locate(root)
    max_pixels = check_max_pixels(max_pixels)
    yield from read_refer(layout, Rules(category=_category), on_issue=on_issue, max_pixels=max_pixels)


def _category(anns: list, ref: dict, tables: Tables) -> str:
    # The release names the annotation's key `categories_id` (COCO: `category_id`).
    names, ann = tables.categories, anns[0]
    for key, holder in (("categories_id", ann), ("category_id", ann), ("category_id", ref)):
        if key in holder:
            return names.get(holder[key], str(holder[key]))
    return ""
