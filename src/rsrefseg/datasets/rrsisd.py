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

import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from pycocotools import mask as mask_utils

from .imagefiles import DEFAULT_MAX_PIXELS, as_binary_mask, as_rgb, check_max_pixels, check_size, image_size, read_array
from .triplet import DatasetError, Issue, IssueHandler, Triplet, check_split_name, plain_file_name, read_json, report

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
    refs = _load_refs(layout.refs)
    instances = _load_json(layout.instances)
    tables = _Tables(
        images={img.get("id"): img for img in instances.get("images", []) if isinstance(img, dict)},
        annotations={ann.get("id"): ann for ann in instances.get("annotations", []) if isinstance(ann, dict)},
        categories={c.get("id"): str(c.get("name", c.get("id"))) for c in instances.get("categories", []) if isinstance(c, dict)},
    )
    for index, ref in enumerate(refs):
        for found in _ref_samples(layout, tables, index, ref, max_pixels):
            if isinstance(found, Issue):
                report(on_issue, found)
            else:
                yield found


@dataclass(frozen=True)
class _Tables:
    """instances.json by id: images, annotations, category names."""

    images: dict
    annotations: dict
    categories: dict


def _ref_samples(layout: Layout, tables: _Tables, index: int, ref: Any, max_pixels: int) -> Iterator[Triplet | Issue]:
    """The samples of the `index`-th ref (one per sentence), or the Issues that leave them out.
    A split name that is not a plain name raises instead (`check_split_name` says why)."""
    where = f"{layout.refs}[{index}]"
    ref_id = ref.get("ref_id", index) if isinstance(ref, dict) else index
    if not isinstance(ref, dict):
        yield Issue("ref is not a dict", id=str(ref_id), where=where)
        return
    first_id = f"{ref_id}_0"
    if ref.get("split") in (None, ""):
        yield Issue("ref has no split", id=first_id, where=where)
        return
    split = check_split_name(ref["split"], where=where, id=first_id)
    sentences = ref.get("sentences") or []
    ann = tables.annotations.get(ref.get("ann_id"))
    image = tables.images.get(ref.get("image_id"))
    if ann is None or image is None:
        missing = "annotation" if ann is None else "image"
        key = ref.get("ann_id") if ann is None else ref.get("image_id")
        yield Issue(f"{missing} {key!r} not in {layout.instances}", id=first_id, split=split, where=where)
        return
    if not sentences:
        yield Issue("ref has no sentences", id=first_id, split=split, where=where)
        return
    file_name = str(image.get("file_name", ""))
    if not plain_file_name(file_name):  # a name from data never becomes a path out of the image folder
        yield Issue(f"image {image.get('id')!r} of {layout.instances}: file_name {file_name!r} is not a plain file name",
                    id=first_id, split=split, where=where)
        return
    image_path = str(layout.images / file_name)
    declared = (int(image.get("height", 0)), int(image.get("width", 0)))
    for sent_index, sentence in enumerate(sentences):
        sample_id = f"{ref_id}_{sent_index}"
        phrase = _phrase(sentence)
        if not phrase:
            yield Issue("sentence has no text", id=sample_id, split=split, where=where)
            continue
        context = f"id {sample_id!r}, {where}"
        yield Triplet(
            id=sample_id,
            phrase=phrase,
            split=split,
            image_loader=_ImageLoader(image_path, context, max_pixels),
            mask_loader=_MaskLoader(ann.get("segmentation"), declared, image_path,
                                    f"annotation {ann.get('id')} of {layout.instances} ({context})", max_pixels),
            where=where,
            image_path=image_path,
            mask_path=f"{layout.instances}#annotation={ann.get('id')}",
            category=_category(ann, ref, tables.categories),
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

    def __init__(self, path: str, context: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.path, self.context, self.max_pixels = path, context, max_pixels

    def __call__(self) -> np.ndarray:
        return _cached_rgb(self.path, self.context, self.max_pixels).copy()


@lru_cache(maxsize=4)
def _cached_rgb(path: str, context: str, max_pixels: int) -> np.ndarray:
    array = read_array(path, what="image", context=context, max_pixels=max_pixels)
    return as_rgb(array, source=f"{path} ({context})")


class _MaskLoader:
    """declared: the image's (height, width) in instances.json (0s when absent); image_path: the
    image file, whose header gives the size the mask is checked against."""

    def __init__(self, segmentation: Any, declared: tuple[int, int], image_path: str, source: str, max_pixels: int):
        self.segmentation, self.declared, self.image_path = segmentation, declared, image_path
        self.source, self.max_pixels = source, max_pixels

    def __call__(self) -> np.ndarray:
        return decode_segmentation(
            self.segmentation, *self.declared, source=self.source, max_pixels=self.max_pixels, image_size=self._image_size()
        )

    def _image_size(self) -> Optional[tuple[int, int]]:
        """The image file's (height, width), from its header; the declared one when the file
        cannot tell (the image's loader says why); None when neither is known."""
        try:
            return image_size(self.image_path, max_pixels=self.max_pixels)
        except Exception:
            return self.declared if all(self.declared) else None


def decode_segmentation(
    segmentation: Any, height: int, width: int, *, source: str,
    max_pixels: int = DEFAULT_MAX_PIXELS, image_size: Optional[tuple[int, int]] = None,
) -> np.ndarray:
    """Any COCO segmentation -> bool [H, W]: a compressed RLE (counts a string), an uncompressed
    one (counts a list of run lengths), a list of RLEs (merged), or polygons (need the image's
    height and width).

    Nothing is decoded before its size is checked (`check_mask_size`): never over `max_pixels`,
    never off `image_size` (the image's (height, width), when known) beyond the release's quirk;
    polygons must lie on their image (`_check_polygons`)."""

    def check(size: tuple[int, int]) -> None:
        check_mask_size(size, image_size, max_pixels=max_pixels, source=f"mask of {source}")

    try:
        rles = _rles(segmentation, height, width, check)
        decoded = mask_utils.decode(rles[0] if len(rles) == 1 else mask_utils.merge(rles))
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"mask of {source} cannot be decoded: {type(exc).__name__}: {_brief(exc)}") from exc
    return as_binary_mask(decoded, source=source)


# RRSIS-D's known quirk (DESIGN "Datasets"; RMSIN issue #12): some JPEGs are a few pixels off the
# 800x800 of their RLEs (800x787, 801x800, ...); those masks are kept, fitted to the image. So a
# mask may differ from its image by at most max(QUIRK_SLACK_PX, the side / QUIRK_SLACK_PART) on
# each side, and nothing else: a mask far larger than its image (or transposed, or another
# image's) is refused before decoding, so an annotation never costs more memory than its image.
QUIRK_SLACK_PX = 16
QUIRK_SLACK_PART = 8
# Polygons are rasterised along their outline, which costs memory in proportion to its length:
# the outlines of one mask may total this many times the image's height + width (a real object's
# outline is a few times that at most).
MAX_OUTLINE = 256


def check_mask_size(size: tuple[int, int], image: Optional[tuple[int, int]], *, max_pixels: int, source: str) -> None:
    """Refuse to decode a (height, width) mask over the cap, or off its image's (height, width)
    by more than the quirk allows."""
    h, w = size
    if h < 1 or w < 1:
        raise DatasetError(f"{source}: claims a size of {_wxh(size)}")
    check_size(f"a {_wxh(size)} mask", h * w, 0, max_pixels=max_pixels, source=source)
    if image is None or tuple(image) == (h, w):
        return
    if all(abs(c - i) <= max(QUIRK_SLACK_PX, i // QUIRK_SLACK_PART) for c, i in zip((h, w), image)):
        return
    raise DatasetError(
        f"{source}: claims a {_wxh(size)} mask but its image is {_wxh(image)}; not decoded (a mask may "
        f"differ from its image by a few pixels, the release's quirk: {QUIRK_SLACK_PX} pixels or "
        f"1/{QUIRK_SLACK_PART} of a side at most)"
    )


def _wxh(size) -> str:
    """(height, width) as WxH."""
    return f"{size[1]}x{size[0]}"


def _rles(segmentation: Any, height: int, width: int, check: Callable[[tuple[int, int]], None]) -> list:
    """The RLEs of a segmentation, each size passed to `check` before anything is built at it."""
    if isinstance(segmentation, dict):
        return [_rle(segmentation, height, width, check)]
    if isinstance(segmentation, list) and segmentation:
        if all(isinstance(s, dict) for s in segmentation):
            rles = [_rle(s, height, width, check) for s in segmentation]
            if len({tuple(r["size"]) for r in rles}) > 1:  # pycocotools would merge them into nothing
                raise ValueError(f"its RLEs differ in size: {', '.join(_wxh(r['size']) for r in rles)}")
            return rles
        polygons = segmentation if all(isinstance(s, list) for s in segmentation) else [segmentation]
        if not (height and width):
            raise ValueError("polygons need the image height and width in instances.json")
        check((height, width))
        polygons = [[float(v) for v in p] for p in polygons]
        _check_polygons(polygons, height, width)
        return mask_utils.frPyObjects(polygons, height, width)
    raise ValueError(f"unsupported segmentation: {type(segmentation).__name__} (expected an RLE, a list of RLEs or polygons)")


def _check_polygons(polygons: list, height: int, width: int) -> None:
    """Polygons lie on their image (within the quirk's slack), with outlines of a bounded length."""
    margin = max(QUIRK_SLACK_PX, max(height, width) // QUIRK_SLACK_PART)
    outline = 0.0
    for polygon in polygons:
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if not (np.isfinite(xy).all() and (xy >= -margin).all() and (xy <= [width + margin, height + margin]).all()):
            raise ValueError(f"polygon points lie outside the {width}x{height} image")
        outline += float(np.abs(xy - np.roll(xy, 1, axis=0)).max(axis=1, initial=0).sum())
    if outline > MAX_OUTLINE * (height + width):
        raise ValueError(f"polygon outlines total {outline:,.0f} pixels, over {MAX_OUTLINE} x (height + width) of the image")


def _rle(rle: dict, height: int, width: int, check: Callable[[tuple[int, int]], None]) -> dict:
    h, w = (int(v) for v in (rle.get("size") or [height, width]))
    check((h, w))
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
