"""Reader of RRSIS-D (Liu et al., RMSIN, CVPR 2024), in the REFER layout it ships in.

    <root>/refs(unc).p        pickled list of refs: ref_id, ann_id, image_id, split,
                              sentences [{raw, sent, ...}], ...
    <root>/instances.json     COCO-style: images [{id, file_name, height, width}],
                              annotations [{id, image_id, segmentation}] where segmentation is an
                              RLE (compressed: counts str; uncompressed: counts list) or polygons
    <root>/JPEGImages/<file_name>    800x800 RGB (images/rrsisd/JPEGImages/ is accepted too: that
                                     is where the RMSIN code expects them)

One triplet per (ref, sentence), id f"{ref_id}_{sentence_index}".
"""

from __future__ import annotations

import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils

from .imagefiles import as_binary_mask, as_rgb, read_array
from .triplet import DatasetError, Issue, IssueHandler, Triplet, read_json, report

REFS_FILE = "refs(unc).p"
INSTANCES_FILE = "instances.json"
IMAGE_DIRS = ("JPEGImages", "images/rrsisd/JPEGImages", "images/JPEGImages")


def read_rrsisd(root: str | Path, *, on_issue: IssueHandler = None) -> Iterator[Triplet]:
    """Yield one lazy `Triplet` per sentence of every ref, in the order of the refs file."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"RRSIS-D folder not found: {root}")
    refs_path, instances_path = root / REFS_FILE, root / INSTANCES_FILE
    for path in (refs_path, instances_path):
        if not path.is_file():
            raise DatasetError(f"not an RRSIS-D folder: {path} is missing")
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
        raise DatasetError(f"not an RRSIS-D folder: no image folder under {root} (looked for {', '.join(IMAGE_DIRS)})")

    refs = _load_refs(refs_path)
    instances = _load_json(instances_path)
    images = {img["id"]: img for img in instances.get("images", [])}
    annotations = {ann["id"]: ann for ann in instances.get("annotations", [])}

    for index, ref in enumerate(refs):
        where = f"{refs_path}[{index}]"
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
            report(on_issue, Issue(f"{missing} {key!r} not in {instances_path}", id=first_id, split=split, where=where))
            continue
        if not sentences:
            report(on_issue, Issue("ref has no sentences", id=first_id, split=split, where=where))
            continue
        image_path = image_dir / str(image.get("file_name", ""))
        height, width = int(image.get("height", 0)), int(image.get("width", 0))
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
                mask_loader=_MaskLoader(ann.get("segmentation"), height, width, f"annotation {ann['id']} ({context})"),
                where=where,
                image_path=str(image_path),
                mask_path=f"{instances_path}#annotation={ann['id']}",
            )


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
    """COCO segmentation (compressed RLE, uncompressed RLE or polygons) -> bool [H, W]."""
    try:
        if isinstance(segmentation, dict):
            size = segmentation.get("size") or [height, width]
            counts = segmentation["counts"]
            if isinstance(counts, list):  # uncompressed: run lengths, column-major, from 0s
                rle = mask_utils.frPyObjects(segmentation, int(size[0]), int(size[1]))
            else:
                rle = {"size": [int(size[0]), int(size[1])], "counts": counts.encode() if isinstance(counts, str) else counts}
            decoded = mask_utils.decode(rle)
        elif isinstance(segmentation, list) and segmentation:
            if not (height and width):
                raise ValueError("polygons need the image height and width in instances.json")
            rles = mask_utils.frPyObjects(segmentation, height, width)
            decoded = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
        else:
            raise ValueError(f"unsupported segmentation {type(segmentation).__name__}")
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"mask of {source} cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if decoded.ndim == 3:  # pycocotools returns [H, W, N] for a list of RLEs
        decoded = decoded.any(axis=2).astype(np.uint8)
    return as_binary_mask(decoded, source=source)


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
