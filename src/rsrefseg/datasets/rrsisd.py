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
list), polygons. Some release JPEGs are not 800x800 while their RLE is: such masks are resized
to the image (nearest), as the authors' loaders do, and reported by prepare.

One triplet per (ref, sentence), id f"{ref_id}_{sentence_index}"; its category is the
annotation's `categories_id` (the ref's `category_id` if absent) named by `categories`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils

from .imagefiles import as_binary_mask, as_rgb, read_array
from .triplet import DatasetError, Issue, IssueHandler, Triplet, read_json, report

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
MAX_MESSAGE = 160  # characters of a decoder's own message: never a whole RLE in an error


@dataclass(frozen=True)
class Layout:
    refs: Path
    instances: Path
    images: Path


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


def read_rrsisd(root: str | Path, *, on_issue: IssueHandler = None, **_mask_policy) -> Iterator[Triplet]:
    """Yield one lazy `Triplet` per sentence of every ref, in the order of the refs file.

    RLE and polygon masks are binary by construction, so the mask policy of prepare does not
    apply here (accepted and ignored).
    """
    layout = locate(root)
    refs = _load_refs(layout.refs)
    instances = _load_json(layout.instances)
    images = {img.get("id"): img for img in instances.get("images", []) if isinstance(img, dict)}
    annotations = {ann.get("id"): ann for ann in instances.get("annotations", []) if isinstance(ann, dict)}
    categories = {c.get("id"): str(c.get("name", c.get("id"))) for c in instances.get("categories", []) if isinstance(c, dict)}

    for index, ref in enumerate(refs):
        where = f"{layout.refs}[{index}]"
        ref_id = ref.get("ref_id", index) if isinstance(ref, dict) else index
        if not isinstance(ref, dict):
            report(on_issue, Issue("ref is not a dict", id=str(ref_id), where=where))
            continue
        split = str(ref.get("split", ""))
        sentences = ref.get("sentences") or []
        first_id = f"{ref_id}_0"
        ann = annotations.get(ref.get("ann_id"))
        image = images.get(ref.get("image_id"))
        if ann is None or image is None:
            missing = "annotation" if ann is None else "image"
            key = ref.get("ann_id") if ann is None else ref.get("image_id")
            report(on_issue, Issue(f"{missing} {key!r} not in {layout.instances}", id=first_id, split=split, where=where))
            continue
        if not sentences:
            report(on_issue, Issue("ref has no sentences", id=first_id, split=split, where=where))
            continue
        image_path = layout.images / str(image.get("file_name", ""))
        height, width = int(image.get("height", 0)), int(image.get("width", 0))
        category = _category(ann, ref, categories)
        for sent_index, sentence in enumerate(sentences):
            sample_id = f"{ref_id}_{sent_index}"
            phrase = _phrase(sentence)
            if not phrase:
                report(on_issue, Issue("sentence has no text", id=sample_id, split=split, where=where))
                continue
            context = f"id {sample_id!r}, {where}"
            yield Triplet(
                id=sample_id,
                phrase=phrase,
                split=split,
                image_loader=_ImageLoader(str(image_path), context),
                mask_loader=_MaskLoader(ann.get("segmentation"), height, width, f"annotation {ann.get('id')} of {layout.instances} ({context})"),
                where=where,
                image_path=str(image_path),
                mask_path=f"{layout.instances}#annotation={ann.get('id')}",
                category=category,
                fit_mask_to_image=True,
            )


def _category(ann: dict, ref: dict, names: dict) -> str:
    # The release names the annotation's key `categories_id` (COCO: `category_id`).
    for key, holder in (("categories_id", ann), ("category_id", ann), ("category_id", ref)):
        if key in holder:
            return names.get(holder[key], str(holder[key]))
    return ""


def _phrase(sentence: Any) -> str:
    # RMSIN/LAVT feed `raw` to the text encoder; `sent` is its lower-cased, de-punctuated form.
    if isinstance(sentence, dict):
        return str(sentence.get("raw") or sentence.get("sent") or "").strip()
    return str(sentence or "").strip()


class _ImageLoader:
    """Picklable, and the sentences of one ref share the decode through a small cache."""

    def __init__(self, path: str, context: str):
        self.path, self.context = path, context

    def __call__(self) -> np.ndarray:
        return _cached_rgb(self.path, self.context).copy()


@lru_cache(maxsize=4)
def _cached_rgb(path: str, context: str) -> np.ndarray:
    array = read_array(path, what="image", context=context)
    return as_rgb(array, source=f"{path} ({context})")


class _MaskLoader:
    def __init__(self, segmentation: Any, height: int, width: int, source: str):
        self.segmentation, self.height, self.width, self.source = segmentation, height, width, source

    def __call__(self) -> np.ndarray:
        return decode_segmentation(self.segmentation, self.height, self.width, source=self.source)


def decode_segmentation(segmentation: Any, height: int, width: int, *, source: str) -> np.ndarray:
    """Any COCO segmentation -> bool [H, W]: a compressed RLE (counts a string), an uncompressed
    one (counts a list of run lengths), a list of RLEs (merged), or polygons (need the image's
    height and width)."""
    try:
        rles = _rles(segmentation, height, width)
        decoded = mask_utils.decode(rles[0] if len(rles) == 1 else mask_utils.merge(rles))
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"mask of {source} cannot be decoded: {type(exc).__name__}: {_brief(exc)}") from exc
    return as_binary_mask(decoded, source=source)


def _rles(segmentation: Any, height: int, width: int) -> list:
    if isinstance(segmentation, dict):
        return [_rle(segmentation, height, width)]
    if isinstance(segmentation, list) and segmentation:
        if all(isinstance(s, dict) for s in segmentation):
            return [_rle(s, height, width) for s in segmentation]
        polygons = segmentation if all(isinstance(s, list) for s in segmentation) else [segmentation]
        if not (height and width):
            raise ValueError("polygons need the image height and width in instances.json")
        return mask_utils.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
    raise ValueError(f"unsupported segmentation: {type(segmentation).__name__} (expected an RLE, a list of RLEs or polygons)")


def _rle(rle: dict, height: int, width: int) -> dict:
    h, w = (int(v) for v in (rle.get("size") or [height, width]))
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed: run lengths over column-major pixels, from 0s
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _brief(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + f"... ({len(text)} characters)"


class _NoGlobalsUnpickler(pickle.Unpickler):
    """refs(unc).p holds only lists, dicts, strings and numbers: refuse anything else, so that a
    tampered pickle cannot run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the refs file must hold plain data")


def _load_refs(path: Path) -> list:
    try:
        with path.open("rb") as f:
            refs = _NoGlobalsUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise DatasetError(f"{path}: cannot be read as a pickled list of refs: {type(exc).__name__}: {exc}") from exc
    if not isinstance(refs, list):
        raise DatasetError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _load_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a COCO-style object with images and annotations")
    return data
