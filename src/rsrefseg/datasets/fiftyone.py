"""Reader of a FiftyOne export of RefSegRS (e.g. the Hugging Face `Voxel51/RefSegRS` copy), without
importing fiftyone.

FiftyOne's `FiftyOneDataset` format is a folder:

    <root>/metadata.json     dataset info (name, sample_fields, ...); not needed here
    <root>/samples.json      {"samples": [ {sample}, ... ]}
    <root>/data/...          the media; sample["filepath"] is relative to <root> (or absolute)
    <root>/fields/<field>/...  masks of Segmentation labels, referenced by "mask_path"

A sample looks like

    {"_id": {"$oid": "..."}, "filepath": "data/12.tif", "tags": ["train"],
     "metadata": {"_cls": "ImageMetadata", ...},
     "phrase": "vehicle in the parking area",
     "segmentation": {"_cls": "Segmentation", "mask_path": "fields/segmentation/12.tif"}}

Field names vary between exports, so: the split is a tag (train/val/test; "validation" counts as
val) or a `split` field; the phrase is the first present of PHRASE_FIELDS (a string, or a
Classification whose `label` is the phrase) unless `phrase_field` is given; the mask is the
Segmentation label (`mask_path`, or an inline `mask`) of `mask_field`, or the only Segmentation
field of the sample. The category is the first present of CATEGORY_FIELDS (a string, or a
Classification) when the export has one, else the phrase's (`categories.phrase_category`).
The id is the media file's stem ("12"); a stem seen again gets "#2", "#3", ...
"""

from __future__ import annotations

import base64
import io
import math
import zlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .categories import phrase_category
from .imagefiles import (
    DEFAULT_MASK_THRESHOLD, DEFAULT_MAX_PIXELS, as_binary_mask, check_max_pixels, check_size, load_mask, load_rgb,
)
from .triplet import DatasetError, Issue, IssueHandler, Triplet, check_split_name, read_json, report

SAMPLES_FILE = "samples.json"
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
PHRASE_FIELDS = ("phrase", "referring_expression", "expression", "sentence", "text", "caption", "prompt")
MASK_FIELDS = ("segmentation", "ground_truth", "mask", "gt_mask")
CATEGORY_FIELDS = ("category", "class", "label", "object_class")


def read_fiftyone(
    root: str | Path,
    *,
    on_issue: IssueHandler = None,
    phrase_field: Optional[str] = None,
    mask_field: Optional[str] = None,
    mask_threshold: int = DEFAULT_MASK_THRESHOLD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[Triplet]:
    """Yield one lazy `Triplet` per sample of samples.json, in file order.

    max_pixels: images and masks (files, or inline .npy) whose header declares more pixels are
    refused before decoding."""
    root, max_pixels = Path(root), check_max_pixels(max_pixels)
    samples_path = root / SAMPLES_FILE
    if not root.is_dir():
        raise DatasetError(f"FiftyOne dataset folder not found: {root}")
    if not samples_path.is_file():
        raise DatasetError(f"not a FiftyOne dataset export: {samples_path} is missing (export with fo.types.FiftyOneDataset)")
    samples = _load_samples(samples_path)

    seen: dict[str, int] = {}
    for index, sample in enumerate(samples):
        found = _read_sample(
            root, sample, f"{samples_path}[samples][{index}]", seen,
            phrase_field=phrase_field, mask_field=mask_field, limits=(mask_threshold, max_pixels),
        )
        if isinstance(found, Issue):
            report(on_issue, found)
        else:
            yield found


def _read_sample(
    root: Path,
    sample: Any,
    where: str,
    seen: dict[str, int],
    *,
    phrase_field: Optional[str],
    mask_field: Optional[str],
    limits: tuple[int, int],
) -> Triplet | Issue:
    """The lazy Triplet of one entry of samples.json, or the Issue that leaves it out. `where`
    locates the entry; `seen` counts the media stems met so far (the ids), and is updated;
    limits: (mask threshold, max pixels). A `split` field that is not a plain name raises."""
    if not isinstance(sample, dict) or not isinstance(sample.get("filepath"), str):
        return Issue("sample has no filepath", where=where)
    image_path = _resolve(root, sample["filepath"])
    sample_id = _sample_id(sample["filepath"], seen)

    split = _split(sample, where=where, sample_id=sample_id)
    if split is None:
        return Issue("no split: expected a train/val/test tag or a `split` field", id=sample_id, where=where)
    try:
        phrase = _phrase(sample, phrase_field)
        label_name, label = _segmentation(sample, mask_field)
    except DatasetError as exc:
        return Issue(str(exc), id=sample_id, split=split, where=where)
    if not phrase:
        return Issue("sample has no phrase", id=sample_id, split=split, where=where)

    context = f"id {sample_id!r}, {where}"
    try:
        mask_path, mask_loader = _mask_source(root, label_name, label, where=where, context=context, limits=limits)
    except DatasetError as exc:
        return Issue(str(exc), id=sample_id, split=split, where=where)
    return Triplet(
        id=sample_id,
        phrase=phrase,
        split=split,
        image_loader=partial(load_rgb, image_path, context=context, max_pixels=limits[1]),
        mask_loader=mask_loader,
        where=where,
        image_path=str(image_path),
        mask_path=str(mask_path),
        category=_label(sample, CATEGORY_FIELDS) or phrase_category(phrase),
    )


def _sample_id(filepath: str, seen: dict[str, int]) -> str:
    """The media file's stem; a stem met before (counted in `seen`, updated here) gets "#2", "#3", ..."""
    stem = Path(filepath).stem
    seen[stem] = seen.get(stem, 0) + 1
    return stem if seen[stem] == 1 else f"{stem}#{seen[stem]}"


def _mask_source(
    root: Path, label_name: str, label: dict, *, where: str, context: str, limits: tuple[int, int]
) -> tuple[Path | str, Callable[[], np.ndarray]]:
    """Where the Segmentation `label` keeps its mask (a file, or inline in samples.json, then
    named after `where`) and the loader that reads it; limits: (mask threshold, max pixels)."""
    threshold, max_pixels = limits
    if label.get("mask_path"):
        mask_path = _resolve(root, label["mask_path"])
        return mask_path, partial(load_mask, mask_path, context=context, threshold=threshold, max_pixels=max_pixels)
    if label.get("mask") is not None:
        mask_path = f"{where}.{label_name}.mask"
        source = f"{label_name} ({context})"
        return mask_path, partial(_inline_mask, label["mask"], source=source, threshold=threshold, max_pixels=max_pixels)
    raise DatasetError(f"Segmentation field {label_name!r} has neither mask_path nor mask")


def _load_samples(path: Path) -> list:
    data = read_json(path)
    samples = data.get("samples") if isinstance(data, dict) else data
    if not isinstance(samples, list):
        raise DatasetError(f"{path}: expected {{\"samples\": [...]}}")
    return samples


def _resolve(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def _split(sample: dict, *, where: str, sample_id: str) -> Optional[str]:
    """The sample's split: its `split` field, else its one split tag (None: neither). Tags are
    free labels, so only split names count among them; a `split` field is a split name, and
    one that is not a plain name raises (`check_split_name`)."""
    value = sample.get("split")
    if isinstance(value, str) and value.lower() in SPLIT_ALIASES:
        return SPLIT_ALIASES[value.lower()]
    if isinstance(value, str):
        check_split_name(value, where=where, id=sample_id)
    tags = [SPLIT_ALIASES[t.lower()] for t in sample.get("tags") or [] if isinstance(t, str) and t.lower() in SPLIT_ALIASES]
    return tags[0] if len(set(tags)) == 1 else None


def _phrase(sample: dict, field: Optional[str]) -> str:
    return _label(sample, (field,) if field else PHRASE_FIELDS)


def _label(sample: dict, names: tuple) -> str:
    """The first of the fields `names` that holds text: a string, a Classification label, or the
    first of a list of strings."""
    for name in names:
        value = sample.get(name)
        if isinstance(value, dict):  # a Classification: the text is its label
            value = value.get("label")
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = value[0]
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _segmentation(sample: dict, field: Optional[str]) -> tuple[str, dict]:
    if field:
        label = sample.get(field)
        if not (isinstance(label, dict) and label.get("_cls") == "Segmentation"):
            raise DatasetError(f"field {field!r} is not a Segmentation label")
        return field, label
    found = {k: v for k, v in sample.items() if isinstance(v, dict) and v.get("_cls") == "Segmentation"}
    if not found:
        raise DatasetError("sample has no Segmentation field")
    if len(found) == 1:
        return next(iter(found.items()))
    for name in MASK_FIELDS:
        if name in found:
            return name, found[name]
    raise DatasetError(f"several Segmentation fields ({', '.join(sorted(found))}); choose one with mask_field=")


def _inline_mask(
    value: Any, *, source: str, threshold: int = DEFAULT_MASK_THRESHOLD, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """A mask stored in samples.json: FiftyOne writes np.save bytes, zlib-compressed, as
    extended JSON {"$binary": {"base64": ...}}. The .npy header's shape is checked against the
    cap before the array is inflated: a few KB of zlib can inflate to gigabytes."""
    try:
        raw = value.get("$binary", value) if isinstance(value, dict) else value
        raw = raw.get("base64") if isinstance(raw, dict) else raw
        array = _npy(base64.b64decode(raw), max_pixels=max_pixels, source=f"inline mask of {source}")
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"inline mask of {source} cannot be decoded: {type(exc).__name__}: {exc}") from exc
    return as_binary_mask(np.asarray(array), source=source, threshold=threshold)


NPY_HEADER_BYTES = 1 << 16  # np.lib.format reads headers of at most 10,000 bytes by default


def _npy(data: bytes, *, max_pixels: int, source: str) -> np.ndarray:
    """np.save bytes, zlib-compressed or (older exports) plain, inflated no further than the size
    their header declares once that size is within the cap."""
    inflate = None
    if not data.startswith(np.lib.format.MAGIC_PREFIX):
        inflate = zlib.decompressobj()
        head = inflate.decompress(data, NPY_HEADER_BYTES)
    else:
        head = data[:NPY_HEADER_BYTES]
    stream = io.BytesIO(head)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
        np.lib.format.read_magic(stream), np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not masks")
    pixels = math.prod(shape[:2]) if shape else 1
    found = "x".join(str(n) for n in shape[1::-1]) + (f" (shape {shape})" if len(shape) != 2 else "")
    check_size(found, pixels, math.prod(shape) * dtype.itemsize, max_pixels=max_pixels, source=source)
    needed = stream.tell() + math.prod(shape) * dtype.itemsize
    if inflate is not None:
        head += inflate.decompress(inflate.unconsumed_tail, max(needed - len(head), 1))
        data = head
    return np.load(io.BytesIO(data[:needed]), allow_pickle=False)
