"""Reader of NWPU-Refer (2025), in the REFER layout it ships in (`refer`).

    <root>/image/image/<file_name>.jpg     1,024-2,048 px
    <root>/new_refs(unc).p                 refs: split, image_id, ann_id (one), category_id,
                                           ref_id, sentences [{raw, sent}]
    <root>/new_instances.json              COCO: annotations with `category_id`, polygons or RLEs

Older copies name the two files refs(unc).p and instances.json (the new names win when both are
there). Splits train, val, test. The quirks:

- multi-target: one expression over several objects is several refs sharing the image, the split
  and the sentence; they become one sample (the first ref's id) whose mask is the union;
- no target: a ref of the category "no target" has an empty mask, and keeps that category;
- some expressions are Chinese or mixed: `keep_non_english` keeps them or leaves them out, and a
  note in the manifest's warnings counts them either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Union

from .imagefiles import DEFAULT_MAX_PIXELS, check_max_pixels
from .language import LanguageFilter
from .refer import Layout, Rules, Tables, coco_category, load_refs, load_tables, read_refer
from .triplet import DatasetError, IssueHandler, Triplet

FILES = (("new_refs(unc).p", "new_instances.json"), ("refs(unc).p", "instances.json"))
IMAGES = ("image/image", "image", "images")
NO_TARGET = "no target"
LAYOUT_HELP = "expected new_refs(unc).p, new_instances.json and image/image/ (or refs(unc).p and instances.json)"


def locate(root: str | Path) -> Layout:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"NWPU-Refer folder not found: {root} ({LAYOUT_HELP})")
    for refs_name, instances_name in FILES:
        refs, instances = root / refs_name, root / instances_name
        if not refs.is_file():
            continue
        if not instances.is_file():
            raise DatasetError(f"not an NWPU-Refer folder: {refs} is there but {instances} is missing")
        images = next((root / d for d in IMAGES if (root / d).is_dir() and not (root / d / "image").is_dir()), None)
        if images is None:
            raise DatasetError(f"NWPU-Refer images not found: none of {', '.join(str(root / d) for d in IMAGES)} is a folder ({LAYOUT_HELP})")
        return Layout(refs, instances, images)
    raise DatasetError(f"not an NWPU-Refer folder: no {FILES[0][0]} or {FILES[1][0]} in {root} ({LAYOUT_HELP})")


def read_nwpu_refer(
    root: str | Path, *, on_issue: IssueHandler = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_non_english: bool = False, **_mask_policy,
) -> Iterator[Triplet]:
    """Yield one lazy `Triplet` per expression (a multi-target one merged), in the order of the
    refs file. RLE and polygon masks are binary: the mask policy does not apply (accepted and
    ignored)."""
    layout, max_pixels = locate(root), check_max_pixels(max_pixels)
    tables = load_tables(layout.instances)
    no_target = {i for i, name in tables.categories.items() if " ".join(name.lower().replace("_", " ").split()) == NO_TARGET}
    language = LanguageFilter(keep_non_english)
    rules = Rules(category=coco_category, annotations=lambda ref, tables: _annotations(ref, tables, no_target),
                  keep_phrase=language, allow_empty=True)
    refs = merge_targets(load_refs(layout.refs))
    yield from read_refer(layout, rules, on_issue=on_issue, max_pixels=max_pixels, refs=refs, tables=tables)
    language.report(on_issue, str(layout.refs))


def merge_targets(refs: list) -> list:
    """One ref per expression: the refs that share image, split and sentence are merged into the
    first (its `ann_ids` the union), each sentence of a ref a ref of its own (`_sentence_index`
    keeps the sample id f"{ref_id}_{index}")."""
    merged: dict[tuple, dict] = {}
    out: list = []
    for position, ref in enumerate(refs):
        if not isinstance(ref, dict) or not isinstance(ref.get("sentences"), list) or not ref["sentences"]:
            out.append(ref)  # refer reports what is wrong with it
            continue
        for index, sentence in enumerate(ref["sentences"]):
            text = str(sentence.get("raw") or sentence.get("sent") or "") if isinstance(sentence, dict) else str(sentence or "")
            key = (ref.get("image_id"), ref.get("split"), " ".join(text.lower().split()))
            if key in merged and key[2]:
                merged[key]["ann_ids"].append(ref.get("ann_id"))
                merged[key]["_ann_refs"].append(ref.get("ref_id", position))
                continue
            one = {**ref, "sentences": [sentence], "_sentence_index": index, "_index": position,
                   "ann_ids": [ref.get("ann_id")], "_ann_refs": [ref.get("ref_id", position)]}
            merged[key] = one
            out.append(one)
    return out


def _annotations(ref: dict, tables: Tables, no_target: set) -> Union[list, str]:
    if ref.get("category_id") in no_target:
        return []
    anns = []
    ann_ids = ref.get("ann_ids", [ref.get("ann_id")])
    for ann_id, ref_id in zip(ann_ids, ref.get("_ann_refs", [ref.get("ref_id")] * len(ann_ids))):
        if ann_id not in tables.annotations:
            return f"annotation {ann_id!r} (of ref {ref_id!r}, one target of this expression)"
        if tables.annotations[ann_id] not in anns:
            anns.append(tables.annotations[ann_id])
    return anns
