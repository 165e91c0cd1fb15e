"""Images to masks outside a labelled split: reading a scene (GeoTIFFs keep their
georeferencing) and segmenting it for a phrase, whole or in tiles. `rsrefseg predict`, the public
`rsrefseg.predict` and the MLflow model all go through `segment`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from rsrefseg.platform.errors import ConfigError

LARGE = 2048  # px: a longer side above this is tiled (default tile: DEFAULT_TILE)
DEFAULT_TILE = 512  # px: RefSegRS's chip size, the scale the real presets train at
GEO_SUFFIXES = (".tif", ".tiff")


@dataclass
class Scene:
    """An RGB image and, for a georeferenced raster, its rasterio profile (crs, transform)."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    profile: Optional[dict] = None

    @property
    def georeferenced(self) -> bool:
        return bool(self.profile and self.profile.get("crs"))


def segment(model, sizes, tokenizer, rgb: np.ndarray, text: str, *, tile: int = 0, overlap: float = 0.25,
            device=None, autocast=None) -> np.ndarray:
    """bool mask [H, W] at the image's size for `text` on an RGB uint8 image [H, W, 3]. `tile`:
    tile side in px (0: the whole image when its longer side is at most LARGE, else DEFAULT_TILE)."""
    import torch

    from rsrefseg.inference.tiling import model_tile_predictor, predict_scene

    device = device or torch.device("cpu")
    model.eval()
    predict = model_tile_predictor(model, sizes, tokenizer, text, device, autocast=autocast)
    tile = tile or (max(rgb.shape[:2]) if max(rgb.shape[:2]) <= LARGE else DEFAULT_TILE)
    return predict_scene(rgb, predict, tile=tile, overlap=overlap)


def read_scene(path: Path) -> Scene:
    """An image file as RGB; a GeoTIFF through rasterio, keeping its georeferencing. Bands
    beyond three are ignored; non-8-bit bands are stretched to 0..255 between their 2nd and 98th
    percentiles (the usual quick-look stretch of 16-bit imagery)."""
    from rsrefseg.datasets.imagefiles import load_rgb

    if path.suffix.lower() not in GEO_SUFFIXES:
        return Scene(load_rgb(path))
    import rasterio

    try:
        with rasterio.open(path) as src:
            bands = src.read(indexes=list(range(1, min(3, src.count) + 1)))
            profile = {"crs": src.crs, "transform": src.transform, "res": src.res}
    except rasterio.errors.RasterioIOError as exc:
        raise ConfigError(f"--image {path}: not a readable raster ({exc})") from exc
    if bands.shape[0] == 1:
        bands = np.repeat(bands, 3, axis=0)
    if bands.dtype != np.uint8:
        bands = np.stack([_stretch(b) for b in bands])
    return Scene(np.ascontiguousarray(bands.transpose(1, 2, 0)), profile if profile["crs"] else None)


def _stretch(band: np.ndarray) -> np.ndarray:
    low, high = np.percentile(band, (2, 98))
    scaled = (band.astype(np.float32) - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
