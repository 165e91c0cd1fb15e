"""Reading image and mask files into checked arrays.

Every reader goes through these functions, so every format gets the same checks and the same
error messages: a missing file, an unreadable or truncated file, an image that is not 8-bit RGB,
a mask whose values are not background/foreground.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .triplet import DatasetError

TIFF_SUFFIXES = (".tif", ".tiff")


def read_array(path: str | Path, *, what: str, context: str = "") -> np.ndarray:
    """Decode one image file (TIFF with tifffile, anything else with Pillow) into an array.

    `what` ("image", "mask") and `context` ("id '12', output_phrase_train.txt:3") only shape the
    error message.
    """
    path = Path(path)
    suffix = f" ({context})" if context else ""
    if not path.is_file():
        raise DatasetError(f"{what} file missing: {path}{suffix}")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return _read_tiff(path)
        with Image.open(path) as im:
            # Palette and 1-bit files decode to their index values; RGB stays RGB. load() is
            # where Pillow notices truncation, so it must run inside the try.
            im.load()
            return np.asarray(im)
    except Exception as exc:  # tifffile and Pillow raise many types for broken files
        raise DatasetError(
            f"{what} file unreadable or truncated: {path}{suffix}: {type(exc).__name__}: {exc}"
        ) from exc


def _read_tiff(path: Path) -> np.ndarray:
    try:
        return np.asarray(tifffile.imread(path))
    except ValueError as exc:
        # tifffile needs the optional imagecodecs package for LZW/JPEG-compressed TIFFs; Pillow
        # decodes those through libtiff, so fall back to it rather than demand another package.
        if "imagecodecs" not in str(exc):
            raise
    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


def as_rgb(array: np.ndarray, *, source: str) -> np.ndarray:
    """An 8-bit image as uint8 [H, W, 3]: grey is replicated, an alpha channel is dropped."""
    if array.dtype != np.uint8:
        raise DatasetError(f"image {source}: expected 8-bit pixels, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise DatasetError(f"image {source}: expected an RGB image [H, W, 3], got shape {array.shape}")
    return np.ascontiguousarray(array)


# The mask binarization policy (README "Mask policy"). Copies of RefSegRS in circulation hold
# 0/1 or 0/255 masks, some re-saved with soft (anti-aliased) or lossy-compressed edges; the field's
# code binarizes them as `> 0` (RSRefSeg-2) or `> 50` (FIANet). Ours: a {0,1} mask is taken as it
# is; an 8-bit mask is foreground where the value is >= `threshold` (default 128, the middle of
# the range, so soft edges split evenly). A file is accepted as a mask only if at most
# MAX_IN_BETWEEN of its pixels lie in the middle band IN_BETWEEN (soft edges are a thin band;
# a photo or a probability map is not), and its values reach the threshold whenever they go
# beyond {0,1} (class indices 0, 1, 2, ... would otherwise silently become background).
DEFAULT_MASK_THRESHOLD = 128
IN_BETWEEN = (64, 191)
MAX_IN_BETWEEN = 0.05


def as_binary_mask(array: np.ndarray, *, source: str, threshold: int = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """A mask as bool [H, W] under the mask policy above; anything that is not a mask is refused
    with the file named, rather than guessed at."""
    if array.ndim == 3:
        # Some tools save masks as RGB(A) with identical channels; anything else is ambiguous.
        channels = array[:, :, :3] if array.shape[2] >= 3 else array
        if not (channels == channels[:, :, :1]).all():
            raise DatasetError(f"mask {source}: has {array.shape[2]} different channels, expected one")
        array = channels[:, :, 0]
    if array.ndim != 2:
        raise DatasetError(f"mask {source}: expected a 2-D mask, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    values = np.unique(array)
    if set(values.tolist()) <= {0, 1}:
        return array == 1
    if array.dtype != np.uint8:
        raise DatasetError(f"mask {source}: expected 8-bit values or 0/1, got {array.dtype} with values {_shown(values)}")
    low, high = IN_BETWEEN
    in_between = float(np.count_nonzero((array >= low) & (array <= high))) / array.size
    if in_between > MAX_IN_BETWEEN:
        raise DatasetError(
            f"mask {source}: not a binary mask: {in_between:.0%} of the pixels are between {low} and {high} "
            f"(values {_shown(values)}); a mask holds 0/1 or 0/255, soft edges allowed "
            f"(at most {MAX_IN_BETWEEN:.0%} of the pixels in between)"
        )
    if values[-1] < threshold:
        raise DatasetError(
            f"mask {source}: values {_shown(values)} never reach the foreground threshold {threshold}: "
            "class indices rather than a 0/255 mask? (prepare --mask-threshold sets the threshold)"
        )
    return array >= threshold


def _shown(values: np.ndarray) -> str:
    return ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")


def load_rgb(path: str | Path, *, context: str = "") -> np.ndarray:
    source = f"{path}" + (f" ({context})" if context else "")
    return as_rgb(read_array(path, what="image", context=context), source=source)


def load_mask(path: str | Path, *, context: str = "", threshold: int = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    source = f"{path}" + (f" ({context})" if context else "")
    return as_binary_mask(read_array(path, what="mask", context=context), source=source, threshold=threshold)
