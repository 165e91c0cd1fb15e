"""Images to masks outside a labelled split: reading a scene (GeoTIFFs keep their
georeferencing) and segmenting it for a phrase, whole or in tiles. `rsrefseg predict`, the public
`rsrefseg.predict` and the MLflow model all go through `segment` or `segment_scene`
(`segment_scene_phrases` for several phrases: the scene read and encoded once for all of them).

A scene on disk is read window by window (`open_scene`), so a 10,000 x 8,000 GeoTIFF is never in
memory whole: each tile reads its own window through rasterio, with GDAL's block cache capped
(READ_CACHE_BYTES; its default, 5% of RAM, would end up holding the whole decoded scene). Bands
beyond three are ignored, one band is repeated as grey, and non-8-bit bands are stretched to
0..255 between their 2nd and 98th percentiles (the usual quick-look stretch of 16-bit imagery).
The stretch is one per scene, so the percentiles are global: they are taken from a decimated
sample of the whole scene (every step-th pixel of every step-th row, at most STRETCH_SAMPLE px a
band, read in block-sized windows), which for a scene of up to STRETCH_SAMPLE px is the
full-resolution scene itself, so its stretch is exactly the one a whole-scene read gave.
Image files other than GeoTIFFs (PNG, JPEG) are decoded whole (their codecs read no windows).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from rsrefseg.platform.errors import ConfigError

LARGE = 2048  # px: a longer side above this is tiled (default tile: DEFAULT_TILE)
DEFAULT_TILE = 512  # px: RefSegRS's chip size, the scale the real presets train at
GEO_SUFFIXES = (".tif", ".tiff")
STRETCH_SAMPLE = 4_000_000  # px a band: the most the 2nd-98th percentile stretch keeps at once
SAMPLE_WINDOW = (256, 4096)  # rows, columns: the windows the stretch's sample is read in
READ_CACHE_BYTES = 16 * 2**20  # GDAL's block cache while a scene is read window by window


@dataclass
class Scene:
    """An RGB image and, for a georeferenced raster, its rasterio profile (crs, transform)."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    profile: Optional[dict] = None

    @property
    def georeferenced(self) -> bool:
        return bool(self.profile and self.profile.get("crs"))


class SceneFile:
    """An image file read window by window: `read(y, x, h, w)` -> uint8 [h, w, 3] on a grid of
    `height` x `width` px. `rescale(factor)` puts that grid at `factor` times the scene's own
    (`scene_shape`): a GeoTIFF is then read through a WarpedVRT at the new size, bilinear (as a
    Pillow resize), window by window too. `profile` is the scene's own (crs, transform, res; None
    when not georeferenced). Use it as a context manager: it holds the open raster."""

    def __init__(self, path: Path):
        self.path, self._stack = Path(path), contextlib.ExitStack()
        self._rgb, self._src, self._reader, self._limits, self.profile = None, None, None, None, None
        if self.path.suffix.lower() not in GEO_SUFFIXES:
            from rsrefseg.datasets.imagefiles import load_rgb

            self._rgb = load_rgb(self.path)
            self.scene_shape = self._rgb.shape[:2]
        else:
            self._open_raster()
        self.height, self.width = self.scene_shape

    def _open_raster(self) -> None:
        import rasterio

        try:
            self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES))
            src = self._src = self._reader = self._stack.enter_context(rasterio.open(self.path))
            self._indexes = list(range(1, min(3, src.count) + 1))
            self.scene_shape = (src.height, src.width)
            profile = {"crs": src.crs, "transform": src.transform, "res": src.res}
            self.profile = profile if profile["crs"] else None
            if any(src.dtypes[i - 1] != "uint8" for i in self._indexes):
                limits = _stretch_limits(src, self._indexes)
                self._limits = limits * 3 if len(limits) == 1 else limits  # grey: one band as three
        except rasterio.errors.RasterioIOError as exc:
            self.close()
            raise ConfigError(f"--image {self.path}: not a readable raster ({exc})") from exc
        except BaseException:
            self.close()
            raise

    @property
    def georeferenced(self) -> bool:
        return bool(self.profile and self.profile.get("crs"))

    def rescale(self, factor: float) -> None:
        """Read on a grid `factor` times the scene's (round(W * factor) x round(H * factor))."""
        height, width = (max(1, round(n * factor)) for n in self.scene_shape)
        if self._rgb is not None:  # decoded whole anyway: resized whole
            from PIL import Image

            self._rgb = np.asarray(Image.fromarray(self._rgb).resize((width, height), Image.BILINEAR))
        else:
            from rasterio.enums import Resampling
            from rasterio.io import MemoryFile
            from rasterio.transform import Affine
            from rasterio.vrt import WarpedVRT

            src = self._src
            bands = self._stack.enter_context(self._stack.enter_context(
                MemoryFile(_bands_vrt(src, self._indexes, self.path).encode(), ext=".vrt")).open())
            transform = src.transform @ Affine.scale(src.width / width, src.height / height)
            self._reader = self._stack.enter_context(WarpedVRT(
                bands, crs=src.crs, transform=transform, width=width, height=height, resampling=Resampling.bilinear))
        self.height, self.width = height, width

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 [h, w, 3]: the window at row y, column x of the read grid."""
        if self._rgb is not None:
            return self._rgb[y : y + h, x : x + w]
        import rasterio
        from rasterio.windows import Window

        try:
            bands = self._reader.read(indexes=self._indexes, window=Window(x, y, w, h))
        except rasterio.errors.RasterioIOError as exc:
            raise ConfigError(f"--image {self.path}: not a readable raster ({exc})") from exc
        if bands.shape[0] == 1:
            bands = np.repeat(bands, 3, axis=0)
        if self._limits is not None:
            bands = np.stack([_stretch(b, low, high) for b, (low, high) in zip(bands, self._limits)])
        return np.ascontiguousarray(bands.transpose(1, 2, 0))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "SceneFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_scene(path: Path) -> SceneFile:
    """An image file to read window by window (a GeoTIFF through rasterio, keeping its
    georeferencing); a context manager."""
    return SceneFile(Path(path))


def read_scene(path: Path) -> Scene:
    """An image file as RGB, whole; a GeoTIFF through rasterio, keeping its georeferencing (the
    same bands and stretch as `open_scene`'s windows)."""
    with open_scene(path) as scene:
        return Scene(scene.read(0, 0, scene.height, scene.width), scene.profile)


def tile_side(height: int, width: int, tile: int = 0) -> int:
    """`tile` px, or when 0: the whole image when its longer side is at most LARGE, else DEFAULT_TILE."""
    return tile or (max(height, width) if max(height, width) <= LARGE else DEFAULT_TILE)


def segment(model, sizes, tokenizer, rgb: np.ndarray, text: str, *, tile: int = 0, overlap: float = 0.25,
            device=None, autocast=None) -> np.ndarray:
    """bool mask [H, W] at the image's size for `text` on an RGB uint8 image [H, W, 3]. `tile`:
    tile side in px (0: the whole image when its longer side is at most LARGE, else DEFAULT_TILE)."""
    from rsrefseg.inference.tiling import predict_scene

    predict = _phrases_predictor(model, sizes, tokenizer, [text], device, autocast)
    return predict_scene(rgb, lambda tiles: predict(tiles)[0], tile=tile_side(*rgb.shape[:2], tile), overlap=overlap)


def segment_scene(model, sizes, tokenizer, scene: SceneFile, text: str, *, tile: int = 0, overlap: float = 0.25,
                  device=None, autocast=None) -> np.ndarray:
    """`segment` of a scene read window by window: bool mask [scene.height, scene.width]; only
    the tiles of one batch and the logits of the rows they still touch are in memory."""
    return segment_scene_phrases(model, sizes, tokenizer, scene, [text], tile=tile, overlap=overlap,
                                 device=device, autocast=autocast)[0]


def segment_scene_phrases(model, sizes, tokenizer, scene: SceneFile, texts: list[str], *, tile: int = 0,
                          overlap: float = 0.25, device=None, autocast=None) -> list[np.ndarray]:
    """`segment_scene` for several phrases at once: one bool mask per phrase, each the one
    `segment_scene` gives for that phrase, with the scene read once and each tile through the
    image encoders once (the mask decoder runs per phrase). In memory: the tiles of one batch,
    per phrase the logits of the rows they still touch (K phrases: K row bands), and the K masks."""
    from rsrefseg.inference.tiling import predict_phrase_tiles

    predict = _phrases_predictor(model, sizes, tokenizer, texts, device, autocast)
    return predict_phrase_tiles(scene.read, scene.height, scene.width, predict,
                                tile=tile_side(scene.height, scene.width, tile), overlap=overlap)


def _phrases_predictor(model, sizes, tokenizer, texts: list[str], device, autocast):
    import torch

    from rsrefseg.inference.tiling import model_phrases_predictor

    model.eval()
    return model_phrases_predictor(model, sizes, tokenizer, texts, device or torch.device("cpu"), autocast=autocast)


_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "uint64": "UInt64", "int64": "Int64", "float32": "Float32", "float64": "Float64"}


def _bands_vrt(src, indexes: list[int], path: Path) -> str:
    """A VRT (XML) of the raster's bands `indexes` alone, no alpha and no mask: the resampling
    of a WarpedVRT over the file itself would be weighted by any band GDAL reads as alpha (such
    as the NIR band of an 8-bit RGB+NIR file), where the windows `read` gives ignore it."""
    from xml.sax.saxutils import escape

    name = escape(str(path.resolve()))
    bands = "".join(
        f'<VRTRasterBand dataType="{_GDAL_TYPES[src.dtypes[b - 1]]}" band="{i}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{name}</SourceFilename><SourceBand>{b}</SourceBand>'
        "</SimpleSource></VRTRasterBand>"
        for i, b in enumerate(indexes, 1))
    transform = ", ".join(repr(float(v)) for v in src.transform.to_gdal())
    return (f'<VRTDataset rasterXSize="{src.width}" rasterYSize="{src.height}"><SRS>{escape(src.crs.to_wkt())}</SRS>'
            f"<GeoTransform>{transform}</GeoTransform>{bands}</VRTDataset>")


def _stretch_limits(src, indexes: list[int]) -> list[tuple]:
    """(2nd, 98th) percentile of each band, from every step-th pixel of every step-th row, step
    chosen so that at most STRETCH_SAMPLE px a band are kept (every pixel when the scene has no
    more). Read in block-sized windows at full resolution and decimated here, so each block is
    decoded once: a decimated read of the whole scene (`src.read(out_shape=...)`) decodes a
    block row again for every row it samples once a block row outgrows GDAL's cache (20 s of a
    10,000 x 8,000 16-bit scene's 25, measured)."""
    from rasterio.windows import Window

    step = max(1, math.ceil(math.sqrt(src.height * src.width / STRETCH_SAMPLE)))
    rows, cols = step * math.ceil(SAMPLE_WINDOW[0] / step), step * math.ceil(SAMPLE_WINDOW[1] / step)
    sample = np.empty((len(indexes), math.ceil(src.height / step), math.ceil(src.width / step)), src.dtypes[indexes[0] - 1])
    for y in range(0, src.height, rows):  # window offsets are multiples of step: the sample is [::step, ::step]
        for x in range(0, src.width, cols):
            window = src.read(indexes=indexes, window=Window(x, y, min(cols, src.width - x), min(rows, src.height - y)))
            part = window[:, ::step, ::step]
            sample[:, y // step : y // step + part.shape[1], x // step : x // step + part.shape[2]] = part
    return [tuple(np.percentile(band, (2, 98))) for band in sample]


def _stretch(band: np.ndarray, low, high) -> np.ndarray:
    scaled = (band.astype(np.float32) - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
