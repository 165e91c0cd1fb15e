"""How prepared shards store pixels: as shipped (JPEG, PNG) or raw, with Parquet's column
compression on top.

    image     the source file's own bytes when it is an RGB JPEG or PNG ("jpeg", "png": no
              re-encoding, no quality loss), else uint8 RGB, row-major [height, width, 3]:
              3 * height * width bytes ("raw": TIFFs, grey or palette files, in-memory sources)
    encoding  "raw", "jpeg" or "png": how `image` is stored (a shard without this column, as
              prepared before it existed, is all "raw")
    mask   one bit a pixel, row-major, each row packed most significant bit first into
           ceil(width / 8) bytes (`numpy.packbits(mask, axis=1)`): height * ceil(width / 8) bytes

Each row also has `height` and `width` columns, so a row decodes without anything else.

Why raw (schema 3) and not PNG (schema 2): decoding a 512 x 512 PNG costs 4-10 ms of CPU, more
than the whole budget of a core that must deliver 150 samples/s to a GPU; a raw image is a
memory copy, and LZ4 decompresses at gigabytes a second inside the Parquet reader
(`benchmarks/ingest.py` prints the three side by side). JPEG datasets (RRSIS-D) ship files 3-13x
smaller than their raw pixels, so their shards keep the files' bytes and the read tasks decode
them (`iter_images`: torchvision at full size, Pillow's `Image.draft` DCT scaling when the
largest model input is smaller than the image, which the pipeline shrinks to that size anyway).
Masks stay packed all the way to the train worker's device
(32 KiB for 512 x 512 instead of 256 KiB) and are unpacked there (`models.device_inputs`).
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np

from .triplet import DatasetError

RAW = "raw"
JPEG = "jpeg"
SHIPPED = {"JPEG": JPEG, "PNG": "png"}  # Pillow's format name -> the `encoding` value
ENCODINGS = (RAW, *SHIPPED.values())

# Parquet compression of the pixel columns. LZ4 over ZSTD: on the noisy synthetic images ZSTD
# stores 13 % less but decodes 2x slower, and decoding is what ingest pays every epoch
# (`benchmarks/ingest.py`). Neither matches PNG's size (about 2/3 of raw there): raw shards are
# larger on disk, the price of cheap epochs. Repeated images cost nothing (prepare's dictionary).
PIXEL_COMPRESSION = "lz4"
ENCODING = {
    "image": "the source file's bytes (encoding jpeg, png) or raw uint8 RGB, row-major [height, width, 3] (encoding raw)",
    "mask": "1 bit a pixel, row-major, rows packed MSB first to ceil(width/8) bytes (numpy.packbits(axis=1))",
}


def encode_image(image: np.ndarray) -> bytes:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_image takes uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image).tobytes()


def shipped_bytes(path: str, image: np.ndarray) -> tuple[bytes, str] | None:
    """(the file's bytes, its encoding) when the file at `path` is an RGB JPEG or PNG whose
    decoding is exactly `image` (what validation decoded), else None (the image is stored raw).
    The comparison decodes the file once more, at prepare: whatever a reader did to the pixels
    (an orientation, a crop, a grey file made RGB), a shard never decodes to other pixels."""
    from PIL import Image

    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            encoding = SHIPPED.get(im.format or "")
            if encoding is None or im.mode != "RGB" or im.size != (image.shape[1], image.shape[0]):
                return None
        # Decoded as the read side decodes it at full size (`iter_images`), so that whichever
        # library that is, the shard gives these pixels.
        same = np.array_equal(_decode_shipped(data, image.shape, path, max(image.shape[:2])), image)
    except (OSError, ValueError, Image.DecompressionBombError, DatasetError):
        return None
    return (data, encoding) if same else None


def decode_images(rows: list, encodings: list[str], shapes: list[tuple], whats: list[str], *, max_side: int) -> list:
    """`iter_images` as a list."""
    return list(iter_images(rows, encodings, shapes, whats, max_side=max_side))


def iter_images(rows: list, encodings: list[str], shapes: list[tuple], whats: list[str], *, max_side: int) -> Iterator[np.ndarray]:
    """Each row's image as uint8 [H, W, 3], one at a time (a caller copying them into a batch
    holds one decoded image, not all): raw rows as views of their bytes, shipped rows decoded.
    A JPEG larger than `max_side` on a side decodes at reduced size (`Image.draft`: DCT scaling
    by 1/2, 1/4 or 1/8, never below `max_side` on either side); the caller shrinks anything
    larger than `max_side` to it."""
    for data, encoding, shape, what in zip(rows, encodings, shapes, whats):
        if encoding == RAW:
            _check_length(len(data), shape, what)
            yield np.asarray(data).reshape(shape)
        elif encoding in ENCODINGS:
            yield _decode_shipped(data, shape, what, max_side)
        else:
            raise DatasetError(f"{what}: unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)}); "
                               "the shard was written by another version (run `rsrefseg prepare` again)")


def _decode_shipped(data, shape: tuple, what: str, max_side: int) -> np.ndarray:
    """A JPEG or PNG at full size decoded by torchvision (`_torch_decoded`), the rest (a JPEG
    drafted smaller, a file torchvision does not give as 8-bit RGB) by Pillow."""
    with _opened(data, shape, what) as im:
        if im.format == "JPEG" and max(im.size) > max_side:
            im.draft("RGB", (max_side, max_side))
        elif im.format in SHIPPED:
            pixels = _torch_decoded(data, im.format, tuple(shape))
            if pixels is not None:
                return pixels
        return np.asarray(im.convert("RGB") if im.mode != "RGB" else im)


def check_header(data, encoding: str, shape: tuple, what: str) -> bool:
    """Whether the file in `data` is of `encoding`'s format; raises DatasetError (naming `what`)
    when it is not of the shard's size or its header is unreadable. Nothing is decoded."""
    with _opened(data, shape, what) as im:
        return SHIPPED.get(im.format or "") == encoding


@contextmanager
def _opened(data, shape: tuple, what: str):
    """The file in `data` opened by Pillow, which reads only its header: the size is checked
    against the shard's before anything is decoded (a shard never makes a decoder allocate more).
    Whatever fails inside (Pillow and torchvision raise many types for broken files) becomes a
    DatasetError that names `what`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(memoryview(data))) as im:
            if (im.height, im.width) != tuple(shape[:2]):
                raise DatasetError(f"{what}: the file is {im.width}x{im.height} where the shard says "
                                   f"{shape[1]}x{shape[0]}; the shard is damaged (run `rsrefseg prepare` again)")
            yield im
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"{what}: cannot decode ({type(exc).__name__}: {exc}); "
                           "the shard is damaged (run `rsrefseg prepare` again)") from exc


def _torch_decoded(data, image_format: str, shape: tuple) -> Optional[np.ndarray]:
    """A JPEG or PNG decoded by torchvision (libjpeg-turbo, libpng) into uint8 [H, W, 3], or None
    when that is not what it gives (a 16-bit PNG). Measured (benchmarks/ingest.py's files, 800 x
    800 JPEG q90, one core): 2.6 ms against Pillow's 3.1, and the array is the decoder's own
    buffer (torchvision's CHW result is a view of HWC memory) where Pillow's passes through its
    4-byte-a-pixel image and two more copies on the way to numpy (another 1.7 ms). Same pixels
    as Pillow's (both libjpeg-turbo's default integer IDCT and upsampling; a PNG is lossless);
    prepare keeps a file's bytes only when this decoding gives the validated pixels
    (`shipped_bytes`)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    decode = decode_jpeg if image_format == "JPEG" else decode_png
    encoded = torch.from_numpy(np.frombuffer(data, np.uint8).copy())  # torch wants writable memory
    chw = decode(encoded, mode=ImageReadMode.RGB)
    if chw.dtype != torch.uint8 or tuple(chw.shape) != (shape[2], shape[0], shape[1]):
        return None
    return chw.permute(1, 2, 0).numpy()


def binary_rows(column) -> list[np.ndarray]:
    """A binary column of a batch (pyarrow) -> each row's bytes as a uint8 view (no copy)."""
    offsets, values = _offsets_values(column)
    return [values[offsets[k] : offsets[k + 1]] for k in range(len(offsets) - 1)]


def encode_mask(mask: np.ndarray) -> bytes:
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise ValueError(f"encode_mask takes bool [H, W], got {mask.dtype} {mask.shape}")
    return np.packbits(mask, axis=1).tobytes()


def packed_width(width: int) -> int:
    return (width + 7) // 8


def image_array(data: bytes, height: int, width: int, *, what: str = "image") -> np.ndarray:
    """uint8 [height, width, 3], a read-only view of `data` (no copy)."""
    shape = (height, width, 3)
    _check_length(len(data), shape, what)
    return np.frombuffer(data, np.uint8).reshape(shape)


def pixel_rows(column, shapes: list[tuple], whats: list[str]) -> np.ndarray:
    """A binary column of a batch (pyarrow) -> its rows as arrays of `shapes`, without copying
    a pixel: [N, *shape] when every row has the same shape (the column's values are contiguous,
    so the rows are one block of memory), else an object array of per-row views.
    `whats` name each row in the error when its length does not fit its shape."""
    offsets, values = _offsets_values(column)
    n = len(offsets) - 1
    for k in range(n):
        _check_length(int(offsets[k + 1] - offsets[k]), shapes[k], whats[k])
    if n and len(set(shapes)) == 1:
        return values[offsets[0] : offsets[n]].reshape((n, *shapes[0]))
    out = np.empty(n, dtype=object)
    out[:] = [values[offsets[k] : offsets[k + 1]].reshape(shapes[k]) for k in range(n)]
    return out


def _offsets_values(column) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, np.int64 if pa.types.is_large_binary(array.type) else np.int32)[array.offset : array.offset + n + 1]
    values = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    return offsets, values


def _check_length(length: int, shape: tuple, what: str) -> None:
    expected = int(np.prod(shape))
    if length != expected:
        raise DatasetError(f"{what}: {length} bytes where {shape} needs {expected}; "
                           "the shard is damaged or was written by another version (run `rsrefseg prepare` again)")
