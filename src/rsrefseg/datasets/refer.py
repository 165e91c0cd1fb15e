"""The REFER layout shared by RRSIS-D, NWPU-Refer and RemoteSAM-270K: a pickled list of refs,
a COCO-style instances.json, and an image folder.

    refs        [{ref_id, split, image_id, ann_id, category_id, sentences: [{raw, sent}], ...}]
    instances   {images: [{id, file_name, height, width}], annotations: [{id, image_id,
                segmentation, ...}], categories: [{id, name}]}

Every reader here yields one triplet per (ref, sentence), id f"{ref_id}_{sentence_index}", and
decodes its mask from the annotations the format's `Rules` pick: one (RRSIS-D), the union of
several (NWPU-Refer's multi-target expressions, RemoteSAM's list of RLEs), or none (an empty
mask: NWPU-Refer's "no target", RemoteSAM's "one-to-zero"). Every COCO segmentation form
decodes: a compressed or uncompressed RLE, a list of RLEs (merged), polygons; nothing is decoded
before its size is checked against its image and the pixel cap.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
from pycocotools import mask as mask_utils

from .imagefiles import DEFAULT_MAX_PIXELS, as_binary_mask, as_rgb, check_size, image_size, read_array
from .triplet import DatasetError, Issue, IssueHandler, Triplet, check_split_name, plain_file_name, read_json, report

MAX_MESSAGE = 160  # characters of a decoder's own message: never a whole RLE in an error


@dataclass(frozen=True)
class Layout:
    refs: Path
    instances: Path
    images: Path


@dataclass(frozen=True)
class Tables:
    """instances.json by id: images, annotations, category names."""

    images: dict
    annotations: dict
    categories: dict


def load_tables(path: Path) -> Tables:
    instances = load_json(path)
    return Tables(
        images={img.get("id"): img for img in instances.get("images", []) if isinstance(img, dict)},
        annotations={ann.get("id"): ann for ann in instances.get("annotations", []) if isinstance(ann, dict)},
        categories={c.get("id"): str(c.get("name", c.get("id"))) for c in instances.get("categories", []) if isinstance(c, dict)},
    )


def _one_annotation(ref: dict, tables: Tables) -> Union[list, str]:
    ann = tables.annotations.get(ref.get("ann_id"))
    return [ann] if ann is not None else f"annotation {ref.get('ann_id')!r}"


@dataclass(frozen=True)
class Rules:
    """What a format makes of a ref.

    annotations(ref, tables): the ref's annotations ([] = no target: an empty mask), or what is
        missing ("annotation 12"), reported with the instances file.
    category(annotations, ref, tables): the sample's category.
    keep_phrase(phrase): False leaves the sentence out (the format counts what it leaves out).
    find_image: a listed file missing on disk may be there under another image extension.
    allow_empty: an annotation with an empty segmentation is an empty mask (else refused).
    """

    category: Callable[[list, dict, Tables], str]
    annotations: Callable[[dict, Tables], Union[list, str]] = _one_annotation
    keep_phrase: Callable[[str], bool] = field(default=lambda phrase: True)
    find_image: bool = False
    allow_empty: bool = False


def read_refer(
    layout: Layout, rules: Rules, *, on_issue: IssueHandler, max_pixels: int,
    refs: Optional[list] = None, tables: Optional[Tables] = None,
) -> Iterator[Triplet]:
    """Triplets of every ref of `layout` (or of `refs`, when the format rewrote them: a ref's
    `_index` is then its position in the refs file, for messages), in order."""
    refs = load_refs(layout.refs) if refs is None else refs
    tables = load_tables(layout.instances) if tables is None else tables
    for index, ref in enumerate(refs):
        position = ref.get("_index", index) if isinstance(ref, dict) else index
        for found in ref_samples(layout, tables, rules, position, ref, max_pixels):
            if isinstance(found, Issue):
                report(on_issue, found)
            else:
                yield found


def ref_samples(layout: Layout, tables: Tables, rules: Rules, index: int, ref: Any, max_pixels: int) -> Iterator[Union[Triplet, Issue]]:
    """The samples of the `index`-th ref (one per sentence), or the Issues that leave them out.
    A split name that is not a plain name raises instead (`check_split_name` says why)."""
    checked = _check_ref(layout, tables, rules, index, ref)
    if isinstance(checked, Issue):
        yield checked
        return
    split, anns, image = checked
    where = f"{layout.refs}[{index}]"
    ref_id, base = ref.get("ref_id", index), int(ref.get("_sentence_index", 0))
    image_path = str(_image_path(layout.images, str(image.get("file_name", "")), rules.find_image))
    declared = (int(image.get("height", 0) or 0), int(image.get("width", 0) or 0))
    ann_ids = ",".join(str(a.get("id")) for a in anns) or "none"
    for sent_index, sentence in enumerate(ref.get("sentences") or [], start=base):
        sample_id = f"{ref_id}_{sent_index}"
        phrase = _phrase(sentence)
        if not phrase:
            yield Issue("sentence has no text", id=sample_id, split=split, where=where)
            continue
        if not rules.keep_phrase(phrase):
            continue
        context = f"id {sample_id!r}, {where}"
        yield Triplet(
            id=sample_id, phrase=phrase, split=split,
            image_loader=ImageLoader(image_path, context, max_pixels),
            mask_loader=MaskLoader([a.get("segmentation") for a in anns], declared, image_path,
                                   f"annotation {ann_ids} of {layout.instances} ({context})", max_pixels, rules.allow_empty),
            where=where, image_path=image_path, mask_path=f"{layout.instances}#annotation={ann_ids}",
            category=rules.category(anns, ref, tables), fit_mask_to_image=True,
        )


def _check_ref(layout: Layout, tables: Tables, rules: Rules, index: int, ref: Any) -> Union[tuple, Issue]:
    """(split, annotations, image) of a ref, or the Issue that leaves all its sentences out."""
    where = f"{layout.refs}[{index}]"
    ref_id = ref.get("ref_id", index) if isinstance(ref, dict) else index
    if not isinstance(ref, dict):
        return Issue("ref is not a dict", id=str(ref_id), where=where)
    first_id = f"{ref_id}_{ref.get('_sentence_index', 0)}"
    if ref.get("split") in (None, ""):
        return Issue("ref has no split", id=first_id, where=where)
    split = check_split_name(ref["split"], where=where, id=first_id)
    anns = rules.annotations(ref, tables)
    image = tables.images.get(ref.get("image_id"))
    if isinstance(anns, str) or image is None:
        missing = anns if isinstance(anns, str) else f"image {ref.get('image_id')!r}"
        return Issue(f"{missing} not in {layout.instances}", id=first_id, split=split, where=where)
    if not ref.get("sentences"):
        return Issue("ref has no sentences", id=first_id, split=split, where=where)
    file_name = str(image.get("file_name", ""))
    if not plain_file_name(file_name):  # a name from data never becomes a path out of the image folder
        return Issue(f"image {image.get('id')!r} of {layout.instances}: file_name {file_name!r} is not a plain file name",
                     id=first_id, split=split, where=where)
    return split, anns, image


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".JPG", ".PNG")


def _image_path(folder: Path, file_name: str, find: bool) -> Path:
    """folder/file_name; with `find`, the same stem under another image extension when only that
    exists (RemoteSAM lists some .png files as .jpg and the reverse). A missing file is reported
    by the image's loader, under its listed name."""
    path = folder / file_name
    if not find or path.exists():
        return path
    stem = Path(file_name).stem
    return next((folder / (stem + s) for s in IMAGE_SUFFIXES if (folder / (stem + s)).is_file()), path)


def _phrase(sentence: Any) -> str:
    # RMSIN/LAVT feed `raw` to the text encoder; `sent` is its lower-cased, de-punctuated form.
    if isinstance(sentence, dict):
        return str(sentence.get("raw") or sentence.get("sent") or "").strip()
    return str(sentence or "").strip()


class MaskLoader:
    """The union of the masks of `segmentations` ([]: an empty mask the size of the image).
    allow_empty: an empty segmentation counts as no mask instead of an undecodable one."""

    def __init__(self, segmentations: list, declared: tuple[int, int], image_path: str, source: str, max_pixels: int,
                 allow_empty: bool = False):
        if allow_empty:
            segmentations = [s for s in segmentations if s]
        self.parts = [_SingleMaskLoader(s, declared, image_path, source, max_pixels) for s in segmentations]
        self.declared, self.image_path, self.source, self.max_pixels = declared, image_path, source, max_pixels

    def __call__(self) -> np.ndarray:
        if not self.parts:
            size = self.parts_size()
            check_mask_size(size, None, max_pixels=self.max_pixels, source=f"mask of {self.source}")
            return np.zeros(size, dtype=bool)
        masks = [part() for part in self.parts]
        if len({m.shape for m in masks}) > 1:
            raise DatasetError(f"mask of {self.source}: its annotations differ in size: {', '.join(_wxh(m.shape) for m in masks)}")
        return np.logical_or.reduce(masks) if len(masks) > 1 else masks[0]

    def parts_size(self) -> tuple[int, int]:
        """The image's (height, width): from its header, else as instances.json declares it."""
        try:
            return image_size(self.image_path, max_pixels=self.max_pixels)
        except Exception:
            if all(self.declared):
                return self.declared
            raise DatasetError(f"mask of {self.source}: an empty mask needs its image's size, and neither the image nor instances.json gives it")


class ImageLoader:
    """Picklable, and the sentences of one ref share the decode through a small cache."""

    def __init__(self, path: str, context: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.path, self.context, self.max_pixels = path, context, max_pixels

    def __call__(self) -> np.ndarray:
        return _cached_rgb(self.path, self.context, self.max_pixels).copy()


@lru_cache(maxsize=4)
def _cached_rgb(path: str, context: str, max_pixels: int) -> np.ndarray:
    array = read_array(path, what="image", context=context, max_pixels=max_pixels)
    return as_rgb(array, source=f"{path} ({context})")


class _SingleMaskLoader:
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


def load_refs(path: Path) -> list:
    try:
        with path.open("rb") as f:
            refs = _NoGlobalsUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise DatasetError(f"{path}: cannot be read as a pickled list of refs: {type(exc).__name__}: {exc}") from exc
    if not isinstance(refs, list):
        raise DatasetError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def load_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a COCO-style object with images and annotations")
    return data


def coco_category(anns: list, ref: dict, tables: Tables) -> str:
    """A ref's category by its COCO `category_id` (the ref's, else its annotations'), named by
    instances.json (NWPU-Refer, RemoteSAM-270K; RRSIS-D spells the key `categories_id`)."""
    for holder in (ref, *anns):
        if "category_id" in holder:
            return tables.categories.get(holder["category_id"], str(holder["category_id"]))
    return ""
