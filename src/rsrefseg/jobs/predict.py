"""`rsrefseg predict`: one image and one phrase to a mask (and an overlay).

Images of any size: the same resize as the data pipeline on the way in, the mask logits
resized back to the image's own size on the way out. The checkpoint is safetensors + YAML, so
loading it never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rsrefseg.platform.config import ConfigError


def segment(model, sizes, tokenizer, rgb: np.ndarray, text: str) -> np.ndarray:
    """bool mask [H, W] at the image's size for `text` on an RGB uint8 image [H, W, 3]."""
    from rsrefseg.datasets.pipeline import resize_image, tokenize

    input_ids, attention_mask = tokenize(tokenizer, [text], sizes.max_text_len)
    batch = {
        "sam_image": torch.from_numpy(resize_image(rgb, sizes.sam_image).copy())[None],
        "siglip_image": torch.from_numpy(resize_image(rgb, sizes.siglip_image).copy())[None],
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
    }
    model.eval()
    with torch.no_grad():
        logits = model(**batch).float()[:, None]  # [1, 1, label, label]
    logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return (logits[0, 0] > 0).numpy()


def blend(rgb: np.ndarray, mask: np.ndarray, colour=(255, 64, 64), alpha: float = 0.5) -> np.ndarray:
    out = rgb.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out.astype(np.uint8)


def run_predict(checkpoint: str, *, image: str, text: str, out: str, overlay: str | None = None) -> np.ndarray:
    from rsrefseg.datasets.imagefiles import load_rgb
    from rsrefseg.jobs.evaluate import resolve_checkpoint
    from rsrefseg.models.checkpoint import load_checkpoint
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.tokenizer import load_tokenizer

    if not text.strip():
        raise ConfigError("--text: the phrase is empty")
    model, cfg = load_checkpoint(resolve_checkpoint(checkpoint))
    rgb = load_rgb(image)
    mask = segment(model, input_sizes(cfg.model, cfg.data.label_size), load_tokenizer(cfg.model), rgb, text)
    _save_png(Image.fromarray(mask.astype(np.uint8) * 255), Path(out))
    print(f"[rsrefseg] mask ({mask.mean() * 100:.1f}% of the image) -> {out}")
    if overlay:
        _save_png(Image.fromarray(blend(rgb, mask)), Path(overlay))
        print(f"[rsrefseg] overlay -> {overlay}")
    return mask


def _save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
