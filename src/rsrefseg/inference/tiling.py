"""Large scenes: cut into overlapping tiles, predict the tiles in batches, stitch the logits.

A model trained on 512-800 px chips sees objects at the chips' scale; a 10,000 x 8,000 px scene
squeezed into one 1024 px input would shrink every vehicle to a dot. So a scene larger than a
tile is covered by a grid of tiles (the last row and column flush with the far edges), each tile
predicted at the model's input size, its logits resized back to the tile and averaged where
tiles overlap. The mask is where the averaged logits are positive.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

# tiles [N, h, w, 3] uint8 -> mask logits [N, h, w] float32, one call per batch of tiles
TilePredictor = Callable[[np.ndarray], np.ndarray]


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
    """bool [H, W]: the stitched mask of a whole RGB scene [H, W, 3]."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be within [0, 1), got {overlap}")
    height, width = rgb.shape[:2]
    total = np.zeros((height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    boxes = list(tiles(height, width, tile, overlap))
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        logits = predict(np.stack([rgb[y : y + h, x : x + w] for y, x, h, w in chunk]))
        for (y, x, h, w), tile_logits in zip(chunk, logits):
            total[y : y + h, x : x + w] += tile_logits
            count[y : y + h, x : x + w] += 1.0
    return total / count > 0


def model_tile_predictor(model, sizes, tokenizer, text: str, device: torch.device, *, autocast=None) -> TilePredictor:
    """A `TilePredictor` of an RSRefSeg model for one phrase: the data pipeline's resize on the
    way in, the logits resized (bilinear) back to the tile on the way out."""
    from rsrefseg.datasets.pipeline import resize_image, tokenize
    from rsrefseg.inference.scoring import predict_logits

    input_ids, attention_mask = tokenize(tokenizer, [text], sizes.max_text_len)

    def predict(batch_tiles: np.ndarray) -> np.ndarray:
        n, h, w = batch_tiles.shape[:3]
        batch = {
            "sam_image": torch.from_numpy(np.stack([resize_image(t, sizes.sam_image) for t in batch_tiles])),
            "siglip_image": torch.from_numpy(np.stack([resize_image(t, sizes.siglip_image) for t in batch_tiles])),
            "input_ids": torch.from_numpy(input_ids).repeat(n, 1),
            "attention_mask": torch.from_numpy(attention_mask).repeat(n, 1),
        }
        logits = predict_logits(model, batch, device, autocast=autocast)[:, None]
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()

    return predict
