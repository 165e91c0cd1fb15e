"""Reading image and mask files into checked arrays.

Every reader goes through these functions, so every format gets the same checks and the same
error messages: a missing file, an unreadable or truncated file, an image that is not 8-bit RGB,
a mask whose values are not background/foreground, a file whose header declares more pixels
than the cap (refused before decoding).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .triplet import DatasetError

TIFF_SUFFIXES = (".tif", ".tiff")

# The decoded-size cap. A few-KB PNG or TIFF can declare 40000x40000 pixels and decode to
# gigabytes, so every file's size is read from its header and checked BEFORE anything is decoded
# (RLE masks: their claimed size, rrsisd.py; inline .npy masks: their header, fiftyone.py).
# 100 Mpx is far above every real dataset (NWPU-Refer's largest images are 2048x2048, RRSIS-D
# 800x800, RefSegRS 512x512); prepare --max-pixels raises it. Decoded bytes are capped too (a
# TIFF can hold many samples per pixel or many pages): at most 8 bytes per capped pixel.
DEFAULT_MAX_PIXELS = 100_000_000
MAX_BYTES_PER_PIXEL = 8
RAISE_CAP = "prepare --max-pixels N raises the cap (max_pixels= in Python)"


def check_max_pixels(max_pixels: int) -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DatasetError(f"max_pixels must be a positive number of pixels, got {max_pixels!r}")
    return max_pixels


def check_size(found: str, pixels: int, nbytes: int, *, max_pixels: int, source: str) -> None:
    """Refuse, before decoding, what would decode to more than `max_pixels` pixels (or their
    bytes). `found` says the size as read from the header ("40000x40000"), `source` the file."""
    if pixels > max_pixels:
        raise DatasetError(
            f"{source}: {found} is {pixels:,} pixels, over the cap of {max_pixels:,} (refused before "
            f"decoding: a decompression bomb, or a dataset of larger images: {RAISE_CAP})"
        )
    if nbytes > max_pixels * MAX_BYTES_PER_PIXEL:
        raise DatasetError(
            f"{source}: {found} would decode to {nbytes:,} bytes, over the cap of "
            f"{max_pixels * MAX_BYTES_PER_PIXEL:,} ({MAX_BYTES_PER_PIXEL} bytes per pixel of the "
            f"{max_pixels:,}-pixel cap; refused before decoding: {RAISE_CAP})"
        )


def allow_pillow(max_pixels: int) -> None:
    """Let Pillow open what the cap allows. Pillow's own bomb check (a DecompressionBombError past
    twice Image.MAX_IMAGE_PIXELS) is process-wide, so it is only ever raised here, never lowered:
    lowering it would refuse other code's images. The cap itself is `check_size`, on the header."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def read_array(path: str | Path, *, what: str, context: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image file (TIFF with tifffile, anything else with Pillow) into an array, once
    its header says it holds at most `max_pixels` pixels.

    `what` ("image", "mask") and `context` ("id '12', output_phrase_train.txt:3") only shape the
    error message.
    """
    path = Path(path)
    suffix = f" ({context})" if context else ""
    if not path.is_file():
        raise DatasetError(f"{what} file missing: {path}{suffix}")
    source = f"{what} file {path}{suffix}"
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return _read_tiff(path, max_pixels, source)
        return _read_pillow(path, max_pixels, source)
    except DatasetError:
        raise
    except Image.DecompressionBombError as exc:
        # Past twice Pillow's limit (which allow_pillow keeps at the cap or above), Image.open
        # refuses before our check can see the size: say it the same way, with its count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found[1]):,} pixels" if found else "more pixels than Pillow allows"
        raise DatasetError(
            f"{source}: {pixels} by its header, over the cap of {max_pixels:,} (refused before "
            f"decoding: a decompression bomb, or a dataset of larger images: {RAISE_CAP})"
        ) from exc
    except Exception as exc:  # tifffile and Pillow raise many types for broken files
        raise DatasetError(
            f"{what} file unreadable or truncated: {path}{suffix}: {type(exc).__name__}: {exc}"
        ) from exc


def image_size(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of an image file from its header, nothing decoded; raises when unreadable."""
    allow_pillow(max_pixels)
    with Image.open(path) as im:
        return im.height, im.width


def _read_pillow(path: Path, max_pixels: int, source: str) -> np.ndarray:
    allow_pillow(max_pixels)
    with Image.open(path) as im:  # reads the header only
        # One frame is decoded, at most 4 bytes a pixel (RGBA, I, F): the pixel count bounds it.
        check_size(f"{im.width}x{im.height}", im.width * im.height, 0, max_pixels=max_pixels, source=source)
        # Palette and 1-bit files decode to their index values; RGB stays RGB. load() is where
        # Pillow notices truncation, so it must run inside the caller's try.
        im.load()
        return np.asarray(im)


def _read_tiff(path: Path, max_pixels: int, source: str) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]  # what tifffile.imread decodes; its shape comes from the tags
        shape, axes = tuple(int(n) for n in series.shape), series.axes
        pixels = math.prod(n for n, axis in zip(shape, axes) if axis != "S")  # pages x rows x columns
        size = "x".join(str(shape[axes.index(a)]) for a in "XY" if a in axes)
        found = f"{size or 'an image'} (shape {shape}, {series.dtype})"
        check_size(found, pixels, math.prod(shape) * series.dtype.itemsize, max_pixels=max_pixels, source=source)
        try:
            return np.asarray(tif.asarray())
        except ValueError as exc:
            # tifffile needs the optional imagecodecs package for LZW/JPEG-compressed TIFFs;
            # Pillow decodes those through libtiff, so fall back to it rather than demand
            # another package.
            if "imagecodecs" not in str(exc):
                raise
    return _read_pillow(path, max_pixels, source)


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


def load_rgb(path: str | Path, *, context: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    source = f"{path}" + (f" ({context})" if context else "")
    return as_rgb(read_array(path, what="image", context=context, max_pixels=max_pixels), source=source)


def load_mask(
    path: str | Path, *, context: str = "", threshold: int = DEFAULT_MASK_THRESHOLD, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    source = f"{path}" + (f" ({context})" if context else "")
    mask = read_array(path, what="mask", context=context, max_pixels=max_pixels)
    return as_binary_mask(mask, source=source, threshold=threshold)
