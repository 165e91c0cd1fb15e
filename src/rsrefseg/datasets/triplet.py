"""One referring-segmentation sample, the problems a reader can report, and the dataset error type.

A reader yields `Triplet`s whose pixels are *not* loaded yet: each carries two zero-argument loaders,
so validating or converting a 20k-sample dataset streams through it with one sample in memory at a
time. Loaders raise `DatasetError` whose message names the file and the sample id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from rsrefseg.platform.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset on disk is missing, malformed or inconsistent.

    The message always says where: the file (and line, for text files) and the sample id.
    """


@dataclass(frozen=True)
class Issue:
    """One problem found while reading a dataset; `prepare_dataset` lists them in the manifest.

    where: the file (and line) that declares the sample, e.g. "output_phrase_val.txt:12".
    """

    reason: str
    id: Optional[str] = None
    split: Optional[str] = None
    where: Optional[str] = None
    # "sample": one sample is bad (skippable); "split": a whole split is empty (never skippable);
    # "note": the sample is kept, with a change worth knowing (a mask resized to its image)
    kind: str = "sample"

    def __str__(self) -> str:
        parts = [self.where] if self.where else []
        if self.id is not None:
            parts.append(f"id {self.id!r}" + (f" ({self.split})" if self.split else ""))
        return ": ".join(parts + [self.reason])

    def to_dict(self) -> dict:
        return {"id": self.id, "split": self.split, "where": self.where, "reason": self.reason}


# Readers take `on_issue`: None means "raise at the first problem" (handy interactively);
# prepare_dataset passes a collector so that it can report every problem at once.
IssueHandler = Optional[Callable[[Issue], None]]


def report(on_issue: IssueHandler, issue: Issue) -> None:
    if on_issue is None:
        raise DatasetError(str(issue))
    on_issue(issue)


@dataclass(frozen=True, eq=False)
class Triplet:
    """(id, phrase, split) plus lazy loaders of the image and the mask.

    load_image() -> uint8 array [H, W, 3] (RGB)
    load_mask()  -> bool array [H, W] (True = the phrase's target)
    where: the file (and line) that declared this sample, for error messages.
    category: the object category the phrase refers to ("" = unknown).
    fit_mask_to_image: a mask whose size differs from the image's is resized to it (nearest)
        instead of refused; for formats whose known quirk this is (RRSIS-D).
    """

    id: str
    phrase: str
    split: str
    image_loader: Callable[[], np.ndarray]
    mask_loader: Callable[[], np.ndarray]
    where: str = ""
    image_path: str = ""
    mask_path: str = ""
    category: str = ""
    fit_mask_to_image: bool = False

    def load_image(self) -> np.ndarray:
        return self.image_loader()

    def load_mask(self) -> np.ndarray:
        return self.mask_loader()

    def issue(self, reason: str) -> Issue:
        return Issue(reason=reason, id=self.id, split=self.split, where=self.where or None)


# A split names a folder of the prepared dataset (<out>/<version>/<split>/part-*.parquet, or a key prefix in
# object storage), so a split read from a dataset file must be a plain name: one path segment that
# cannot climb ("..", "../x"), be absolute ("/tmp/x") or nest ("a/b"). train, val, test, testA,
# testB (RemoteSAM-270K) all fit.
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_split_name(name: object, *, where: str, id: Optional[str] = None) -> str:
    """`name` if it is a safe split name, else DatasetError naming `where` (the file, line or
    entry that declares it), the sample `id` and the name.

    Always raised, never reported as a skippable Issue: a split name is not a per-sample slip
    but the output path of a whole group of samples, and one that climbs or is absolute is a
    crafted file, not a typo. Refusing the dataset (nothing written) is safer than preparing
    the rest of a file made to write elsewhere, with some of its samples silently left out.
    """
    if isinstance(name, str) and SPLIT_NAME.fullmatch(name):
        return name
    sample = f"id {id!r}: " if id is not None else ""
    raise DatasetError(
        f"{where}: {sample}split name {name!r} refused: a split becomes a folder of the output, so it "
        "must be 1-64 letters, digits, '_' or '-', starting with a letter or digit (train, val, test, "
        "testA, ...), never a path"
    )


def plain_file_name(name: str) -> bool:
    """Whether `name` (a file name a dataset gives, to be joined to one of its folders) stays in
    that folder: one path segment, not "." or "..", no separator of any platform."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def read_json(path: Path):
    """A JSON file that must be UTF-8; errors name the file (and line) as DatasetError."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not valid UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
