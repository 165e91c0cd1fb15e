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

Several phrases of one scene share the reads and the image encodings: a `PhrasesPredictor` gives
one logits array per phrase for each batch of tiles (`model_phrases_predictor`: the image encoders
once, the mask decoder once per phrase), and the stitching keeps one row band per phrase, so K
phrases hold K row bands of logits (never a whole scene's) and each phrase's mask is the one a
call with that phrase alone gives, bit for bit.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

# tiles [N, h, w, 3] uint8 -> mask logits [N, h, w] float32, one call per batch of tiles
TilePredictor = Callable[[np.ndarray], np.ndarray]
# tiles [N, h, w, 3] uint8 -> one mask logits array [N, h, w] float32 per phrase, in phrase order
PhrasesPredictor = Callable[[np.ndarray], list[np.ndarray]]
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
    return predict_phrase_tiles(read, height, width, lambda t: [predict(t)], tile=tile, overlap=overlap,
                                batch=batch)[0]


def predict_phrase_tiles(read: TileReader, height: int, width: int, predict: PhrasesPredictor, *, tile: int,
                         overlap: float = 0.25, batch: int = 8) -> list[np.ndarray]:
    """One bool [height, width] mask per phrase of `predict`, the scene's tiles read once for all."""
    masks: list[np.ndarray] = []
    for top, rows in stitch_phrase_rows(read, height, width, predict, tile=tile, overlap=overlap, batch=batch):
        masks = masks or [np.empty((height, width), bool) for _ in rows]
        for mask, phrase_rows in zip(masks, rows):
            mask[top : top + len(phrase_rows)] = phrase_rows
    return masks


def stitch_phrase_rows(read: TileReader, height: int, width: int, predict: PhrasesPredictor, *, tile: int,
                       overlap: float = 0.25, batch: int = 8) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(first row, one bool rows [n, width] array per phrase) of the stitched masks, top to
    bottom, each yielded as soon as no later tile covers it: each batch of tiles is read and
    predicted once for every phrase, and each phrase's logits go to its own row band (K phrases:
    K bands in memory)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be within [0, 1), got {overlap}")
    boxes = list(tiles(height, width, tile, overlap))
    bands: list[_RowBand] = []
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        per_phrase = predict(np.stack([read(*box) for box in chunk]))
        bands = bands or [_RowBand(width) for _ in per_phrase]
        for band, logits in zip(bands, per_phrase):
            for (y, x, h, w), tile_logits in zip(chunk, logits):
                band.add(y, x, tile_logits)
        final = boxes[i + batch][0] if i + batch < len(boxes) else height  # later tiles start here or below
        if final > bands[0].top:
            top = bands[0].top
            yield top, [band.release(final) for band in bands]


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
    """A `TilePredictor` of an RSRefSeg model for one phrase: `model_phrases_predictor` of [text]."""
    predict = model_phrases_predictor(model, sizes, tokenizer, [text], device, autocast=autocast)
    return lambda batch_tiles: predict(batch_tiles)[0]


def model_phrases_predictor(model, sizes, tokenizer, texts: list[str], device: torch.device, *,
                            autocast=None) -> PhrasesPredictor:
    """A `PhrasesPredictor` of an RSRefSeg model (either architecture) for `texts`: each batch of
    tiles through the image encoders once (`model.encode_images`), then the mask decoder once per
    phrase (`model.decode`). The data pipeline's resize on the way in, the logits resized
    (bilinear) back to the tile on the way out. Each phrase's tokens and text features are made
    once, not per batch; each phrase's logits are those of `model.forward` on that phrase alone."""
    from rsrefseg.datasets.pipeline import tokenize
    from rsrefseg.inference.scoring import autocast_context
    from rsrefseg.models.device_inputs import crop_valid

    device = torch.device(device)
    tokens = [tokenize(tokenizer, [text], sizes.max_text_len) for text in texts]
    text_features: dict[int, list] = {}  # batch size -> each phrase's text features

    def phrases_at(n: int) -> list:
        # The text tower runs on the phrase repeated to the batch's size, as `forward` ran it: one
        # row broadcast to n could round differently. That is at most two sizes a scene (the full
        # batches and the last one).
        if n not in text_features:
            text_features[n] = [model.encode_text(*(torch.from_numpy(a).repeat(n, 1).to(device) for a in pair))
                                for pair in tokens]
        return text_features[n]

    @torch.no_grad()
    def predict(batch_tiles: np.ndarray) -> list[np.ndarray]:
        n, h, w = batch_tiles.shape[:3]
        sam_image, siglip_image, valid = _model_images(batch_tiles, sizes)
        with autocast_context(device, autocast):
            images = model.encode_images(sam_image.to(device, non_blocking=True),
                                         siglip_image.to(device, non_blocking=True))
            logits = [model.decode(images, text).float() for text in phrases_at(n)]
        return [torch.cat([F.interpolate(x[None, None], size=(h, w), mode="bilinear", align_corners=False)[0]
                           for x in crop_valid(phrase_logits, valid)]).cpu().numpy() for phrase_logits in logits]

    return predict


def _model_images(batch_tiles: np.ndarray, sizes):
    """(sam_image, siglip_image, valid) of a batch of tiles, as the data pipeline makes them."""
    from rsrefseg.datasets.pipeline import resize_image
    from rsrefseg.models.device_inputs import model_images

    if sizes.keep_ratio:  # letterboxed as in training; the logits of the image area only
        return model_images(torch.from_numpy(np.ascontiguousarray(batch_tiles)), sizes)
    sam_image = torch.from_numpy(np.stack([resize_image(t, sizes.sam_image) for t in batch_tiles]))
    siglip_image = torch.from_numpy(np.stack([resize_image(t, sizes.siglip_image) for t in batch_tiles]))
    return sam_image, siglip_image, None
