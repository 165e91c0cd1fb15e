"""How prepared shards store pixels: raw, with Parquet's column compression on top.

    image  uint8 RGB, row-major [height, width, 3]: 3 * height * width bytes
    mask   one bit a pixel, row-major, each row packed most significant bit first into
           ceil(width / 8) bytes (`numpy.packbits(mask, axis=1)`): height * ceil(width / 8) bytes

Each row also has `height` and `width` columns, so a row decodes without anything else.

Why raw (schema 3) and not PNG (schema 2): decoding a 512 x 512 PNG costs 4-10 ms of CPU, more
than the whole budget of a core that must deliver 150 samples/s to a GPU; a raw image is a
memory copy, and LZ4 decompresses at gigabytes a second inside the Parquet reader
(`benchmarks/ingest.py` prints the three side by side). Masks stay packed all the way to the train worker's device
(32 KiB for 512 x 512 instead of 256 KiB) and are unpacked there (`models.device_inputs`).
"""

from __future__ import annotations

import numpy as np

from .triplet import DatasetError

# Parquet compression of the pixel columns. LZ4 over ZSTD: on the noisy synthetic images ZSTD
# stores 13 % less but decodes 2x slower, and decoding is what ingest pays every epoch
# (`benchmarks/ingest.py`). Neither matches PNG's size (about 2/3 of raw there): raw shards are
# larger on disk, the price of cheap epochs. Repeated images cost nothing (prepare's dictionary).
PIXEL_COMPRESSION = "lz4"
ENCODING = {
    "image": "raw uint8 RGB, row-major [height, width, 3]",
    "mask": "1 bit a pixel, row-major, rows packed MSB first to ceil(width/8) bytes (numpy.packbits(axis=1))",
}


def encode_image(image: np.ndarray) -> bytes:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_image takes uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image).tobytes()


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
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, np.int64 if pa.types.is_large_binary(array.type) else np.int32)[array.offset : array.offset + n + 1]
    values = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    for k in range(n):
        _check_length(int(offsets[k + 1] - offsets[k]), shapes[k], whats[k])
    if n and len(set(shapes)) == 1:
        return values[offsets[0] : offsets[n]].reshape((n, *shapes[0]))
    out = np.empty(n, dtype=object)
    out[:] = [values[offsets[k] : offsets[k + 1]].reshape(shapes[k]) for k in range(n)]
    return out


def _check_length(length: int, shape: tuple, what: str) -> None:
    expected = int(np.prod(shape))
    if length != expected:
        raise DatasetError(f"{what}: {length} bytes where {shape} needs {expected}; "
                           "the shard is damaged or was written by another version (run `rsrefseg prepare` again)")
