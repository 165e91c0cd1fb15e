"""Reader of RISBench (Dong et al., CroBIM), as distributed.

    <root>/img_rgb/<file name>              512x512 RGB PNG, one per expression (test_12_0.png:
                                            split_image_object)
    <root>/mask/<file name>                 its mask, 8-bit, the same file name
    <root>/output_phrase_{train,val,test}.txt   one "<file name> <sentence>" per line, split at
                                            the first space

A `RISBench_dataset/` folder inside the root given is accepted too. Masks are binarized by the
mask policy (`imagefiles.as_binary_mask`, `mask_threshold`). No category is stored: it comes from
the phrase by the rule of `categories` over RISBench's 26 categories. The sample id is the file
name without its extension.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator

from .categories import risbench_category
from .imagefiles import DEFAULT_MASK_THRESHOLD, DEFAULT_MAX_PIXELS, check_max_pixels, load_mask, load_rgb
from .language import LanguageFilter
from .triplet import DatasetError, Issue, IssueHandler, Triplet, check_split_name, plain_file_name, report

SPLITS = ("train", "val", "test")
LAYOUT = "img_rgb/, mask/ and output_phrase_{train,val,test}.txt (in the root or in RISBench_dataset/)"


def locate(root: str | Path) -> Path:
    """The folder holding RISBench's phrase files: the root, or its RISBench_dataset/."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"RISBench folder not found: {root} (expected {LAYOUT})")
    for folder in (root, root / "RISBench_dataset"):
        if (folder / "output_phrase_train.txt").is_file():
            missing = [str(folder / n) for n in ("img_rgb", "mask") if not (folder / n).is_dir()]
            missing += [str(_phrases(folder, s)) for s in SPLITS if not _phrases(folder, s).is_file()]
            if missing:
                raise DatasetError(f"not a RISBench folder: missing {', '.join(missing)} (expected {LAYOUT})")
            return folder
    raise DatasetError(f"not a RISBench folder: no output_phrase_train.txt in {root} or {root / 'RISBench_dataset'} (expected {LAYOUT})")


def _phrases(folder: Path, split: str) -> Path:
    return folder / f"output_phrase_{split}.txt"


def read_risbench(
    root: str | Path, *, on_issue: IssueHandler = None, mask_threshold: int = DEFAULT_MASK_THRESHOLD,
    max_pixels: int = DEFAULT_MAX_PIXELS, keep_non_english: bool = False,
) -> Iterator[Triplet]:
    """Yield one lazy `Triplet` per phrase line, split by split, in file order.

    A bad line (not UTF-8, no sentence, a file name that is a path) goes to `on_issue`; a missing
    folder or phrase file raises. keep_non_english: keep the Chinese or mixed sentences (always
    counted in a note)."""
    folder, max_pixels = locate(root), check_max_pixels(max_pixels)
    language = LanguageFilter(keep_non_english)
    for split in SPLITS:
        path = _phrases(folder, split)
        check_split_name(split, where=str(path))
        yielded = 0
        for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
            found = _parse_line(raw, lineno == 1, split, f"{path}:{lineno}")
            if isinstance(found, Issue):
                report(on_issue, found)
            elif found is not None and language(found[1]):
                yield _triplet(folder, *found, split, f"{path}:{lineno}", mask_threshold, max_pixels)
                yielded += 1
        if yielded == 0:
            report(on_issue, Issue(f"split {split!r} is empty: {path} has no samples", split=split, where=str(path), kind="split"))
    language.report(on_issue, str(folder))


def _parse_line(raw: bytes, first: bool, split: str, where: str) -> tuple[str, str] | Issue | None:
    """(file name, sentence) of one line, the Issue that leaves it out, or None (a blank line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        guess = raw.decode("utf-8", errors="replace").split(" ", 1)
        return Issue(f"line is not valid UTF-8 (byte {exc.start})", id=Path(guess[0]).stem or None, split=split, where=where)
    text = (text.lstrip("\ufeff") if first else text).strip()
    if not text:
        return None
    name, _, sentence = text.partition(" ")
    sentence = sentence.strip()
    if not sentence:
        return Issue("line has a file name but no sentence", id=Path(name).stem, split=split, where=where)
    if not plain_file_name(name):  # the name joins img_rgb/ and mask/: never a path out of them
        return Issue(f"file name {name!r} is not a plain file name", id=name, split=split, where=where)
    return name, sentence


def _triplet(folder: Path, name: str, sentence: str, split: str, where: str, threshold: int, max_pixels: int) -> Triplet:
    sample_id = Path(name).stem
    image_path, mask_path = folder / "img_rgb" / name, folder / "mask" / name
    context = f"id {sample_id!r}, {where}"
    return Triplet(
        id=sample_id, phrase=sentence, split=split,
        image_loader=partial(load_rgb, image_path, context=context, max_pixels=max_pixels),
        mask_loader=partial(load_mask, mask_path, context=context, threshold=threshold, max_pixels=max_pixels),
        where=where, image_path=str(image_path), mask_path=str(mask_path), category=risbench_category(sentence),
    )
