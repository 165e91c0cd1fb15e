"""Large scenes: cut into overlapping tiles, predict the tiles in batches, stitch the logits.

A model trained on 512-800 px chips sees objects at the chips' scale; a 10,000 x 8,000 px scene
squeezed into one 1024 px input would shrink every vehicle to a dot. So a scene larger than a
tile is covered by a grid of tiles (the last row and column flush with the far edges), each tile
predicted at the model's input size, its logits resized back to the tile and averaged where
tiles overlap. The mask is where the averaged logits are positive.

Stitching goes in row bands: tiles are predicted in grid order (row by row), so once a batch is
done, every row above the next tile's first row is final. Logit sums and counts are kept only for
the rows tiles can still touch (`_RowBand`: about a tile's height plus a batch's worth of tile rows,
full width), and each finished row goes straight into the bool mask (1 byte a pixel). The sums
are the same float32 additions in the same order as over a whole-scene accumulator, so the mask
is the same, bit for bit. The tiles themselves come from a `TileReader`, so a scene on disk is
read one tile window at a time (`inference.scenes.SceneFile`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

# tiles [N, h, w, 3] uint8 -> mask logits [N, h, w] float32, one call per batch of tiles
TilePredictor = Callable[[np.ndarray], np.ndarray]
# (y, x, h, w) -> the scene's pixels there, uint8 [h, w, 3]
TileReader = Callable[[int, int, int, int], np.ndarray]


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` px overlapping by at least
    `overlap` (0..0.9) of a tile; the last tile ends exactly at `length`."""
    if length <= tile:
        return [0]
    stride = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def tiles(height: int, width: int, tile: int, overlap: float) -> Iterator[tuple[int, int, int, int]]:
    """(y0, x0, h, w) of every tile of a height x width scene."""
    for y in tile_starts(height, tile, overlap):
        for x in tile_starts(width, tile, overlap):
            yield y, x, min(tile, height), min(tile, width)


def predict_scene(rgb: np.ndarray, predict: TilePredictor, *, tile: int, overlap: float = 0.25, batch: int = 8) -> np.ndarray:
    """bool [H, W]: the stitched mask of a whole RGB scene [H, W, 3] in memory."""
    height, width = rgb.shape[:2]
    return predict_tiles(lambda y, x, h, w: rgb[y : y + h, x : x + w], height, width, predict,
                         tile=tile, overlap=overlap, batch=batch)


def predict_tiles(read: TileReader, height: int, width: int, predict: TilePredictor, *, tile: int,
                  overlap: float = 0.25, batch: int = 8) -> np.ndarray:
    """bool [height, width]: the stitched mask of a scene whose tiles `read` gives."""
    mask = np.empty((height, width), bool)
    for top, rows in stitch_rows(read, height, width, predict, tile=tile, overlap=overlap, batch=batch):
        mask[top : top + len(rows)] = rows
    return mask


def stitch_rows(read: TileReader, height: int, width: int, predict: TilePredictor, *, tile: int,
                overlap: float = 0.25, batch: int = 8) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, bool rows [n, width]) of the stitched mask, top to bottom, each yielded as
    soon as no later tile covers it."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be within [0, 1), got {overlap}")
    boxes = list(tiles(height, width, tile, overlap))
    band = _RowBand(width)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        logits = predict(np.stack([read(*box) for box in chunk]))
        for (y, x, h, w), tile_logits in zip(chunk, logits):
            band.add(y, x, tile_logits)
        final = boxes[i + batch][0] if i + batch < len(boxes) else height  # later tiles start here or below
        if final > band.top:
            top = band.top
            yield top, band.release(final)


class _RowBand:
    """Logit sums and tile counts (float32) of the rows [top, top + used) that tiles still touch."""

    def __init__(self, width: int):
        self.top, self.used = 0, 0
        self.total = np.zeros((0, width), np.float32)
        self.count = np.zeros((0, width), np.float32)

    def add(self, y: int, x: int, logits: np.ndarray) -> None:
        h, w = logits.shape
        start, end = y - self.top, y - self.top + h
        if end > len(self.total):
            self.total, self.count = (np.concatenate([a, np.zeros((end - len(a), a.shape[1]), np.float32)])
                                      for a in (self.total, self.count))
        self.used = max(self.used, end)
        self.total[start:end, x : x + w] += logits
        self.count[start:end, x : x + w] += 1.0

    def release(self, until: int) -> np.ndarray:
        """bool [until - top, width]: the mask of the rows above `until`, dropped from the band."""
        n = until - self.top
        rows = self.total[:n] / self.count[:n] > 0
        keep = self.used - n
        for a in (self.total, self.count):
            a[:keep] = a[n : self.used]
            a[keep : self.used] = 0.0
        self.top, self.used = until, keep
        return rows


def model_tile_predictor(model, sizes, tokenizer, text: str, device: torch.device, *, autocast=None) -> TilePredictor:
    """A `TilePredictor` of an RSRefSeg model for one phrase: the data pipeline's resize on the
    way in, the logits resized (bilinear) back to the tile on the way out."""
    from rsrefseg.datasets.pipeline import resize_image, tokenize
    from rsrefseg.inference.scoring import predict_logits
    from rsrefseg.models.device_inputs import crop_valid, model_images

    input_ids, attention_mask = tokenize(tokenizer, [text], sizes.max_text_len)

    def predict(batch_tiles: np.ndarray) -> np.ndarray:
        n, h, w = batch_tiles.shape[:3]
        if sizes.keep_ratio:  # letterboxed as in training; the logits of the image area only
            sam_image, siglip_image, valid = model_images(torch.from_numpy(np.ascontiguousarray(batch_tiles)), sizes)
        else:
            sam_image = torch.from_numpy(np.stack([resize_image(t, sizes.sam_image) for t in batch_tiles]))
            siglip_image = torch.from_numpy(np.stack([resize_image(t, sizes.siglip_image) for t in batch_tiles]))
            valid = None
        batch = {
            "sam_image": sam_image,
            "siglip_image": siglip_image,
            "input_ids": torch.from_numpy(input_ids).repeat(n, 1),
            "attention_mask": torch.from_numpy(attention_mask).repeat(n, 1),
        }
        logits = crop_valid(predict_logits(model, batch, device, autocast=autocast), valid)
        return torch.cat([F.interpolate(x[None, None], size=(h, w), mode="bilinear", align_corners=False)[0]
                          for x in logits]).cpu().numpy()

    return predict
