"""The prediction gallery: the k worst and k best samples by IoU of a pass over a split, kept
while scoring (`inference.scoring.score` offers every batch), and drawn as one figure for MLflow
(training's epochs and `rsrefseg evaluate`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Each panel of the prediction gallery is drawn at this size, whatever the model's input size
# (64 px at `tiny`, 1024 px at the real presets), so galleries of all presets read alike.
GALLERY_TILE = 240
# The gallery's layout, in pixels: a row's caption above its panels, the space around panels, and
# the header (the title, when there is one, then the column headings).
GALLERY_CAPTION, GALLERY_GAP, GALLERY_TITLE, GALLERY_HEADINGS = 18, 4, 22, 18


class Gallery:
    """The k lowest- and k highest-IoU samples seen so far, with their pixels (label size)."""

    def __init__(self, k: int):
        self.k = k
        self.kept: list[dict] = []

    def offer(self, batch: dict, pred: torch.Tensor, ious: list[float]) -> None:
        if not self.k:
            return
        for i, iou in enumerate(ious):
            self.kept.append({"iou": iou, "id": batch["id"][i], "phrase": batch["phrase"][i], "i": i, "batch": batch, "pred": pred})
        self.kept.sort(key=lambda e: (e["iou"], e["id"]))
        if len(self.kept) > 2 * self.k:
            self.kept = self.kept[: self.k] + self.kept[-self.k :]
        for e in self.kept:  # keep one sample's pixels, not whole batches
            if "batch" in e:
                batch, i = e.pop("batch"), e.pop("i")
                e.update(image=batch["sam_image"][i].cpu(), mask=batch["mask"][i].cpu(), pred=e["pred"][i].cpu())

    def examples(self) -> list[dict]:
        """Lowest IoU first; with more than k samples, the first k are the worst, the rest the best."""
        ranked = len(self.kept) > self.k

        def note(j: int, e: dict) -> str:
            return f"IoU {e['iou']:.2f}" + ((" (worst)" if j < self.k else " (best)") if ranked else "")

        return [{**e, "note": note(j, e)} for j, e in enumerate(self.kept)]




def prediction_image(examples: list[dict], *, title: str = "", tile: int = GALLERY_TILE):
    """Rows of (image, ground truth, prediction) with the phrase (and an optional "note", e.g.
    the sample's IoU) above each row, as one PIL RGB image.

    Composed with Pillow rather than drawn with matplotlib: a train run logs one per epoch on
    rank 0 while the other ranks wait for it at the next epoch's data, and matplotlib took
    about 1.2 s of that wait on a CPU worker against a few milliseconds here (README, Performance).
    """
    from PIL import Image, ImageDraw

    font = _font(12)
    caption, gap = GALLERY_CAPTION, GALLERY_GAP
    header = (GALLERY_TITLE if title else 0) + GALLERY_HEADINGS
    width = 3 * tile + 4 * gap
    height = header + len(examples) * (caption + tile + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 4), title, fill="black", font=_font(14))
    for col, heading in enumerate(("image", "ground truth", "prediction")):
        draw.text((gap + col * (tile + gap), header - GALLERY_HEADINGS + 2), heading, fill="dimgray", font=font)
    top = header
    for ex in examples:
        note = f'  {ex["note"]}' if ex.get("note") else ""
        draw.text((gap, top + 2), f'"{ex["phrase"]}"{note}', fill="black", font=font)
        top += caption
        panels = (
            _panel(ex["image"].permute(1, 2, 0).numpy(), tile, Image.BILINEAR),
            _panel(ex["mask"].numpy(), tile, Image.NEAREST),
            _panel(ex["pred"].numpy(), tile, Image.NEAREST),
        )
        for col, panel in enumerate(panels):
            canvas.paste(panel, (gap + col * (tile + gap), top))
        top += tile + gap
    return canvas


def _panel(pixels, tile: int, resample):
    """One gallery panel: uint8 RGB [H, W, 3], or a 0/1 (or bool) mask [H, W] drawn white on black;
    a letterboxed label's padding (IGNORE_LABEL) drawn grey, neither target nor background."""
    import numpy as np
    from PIL import Image

    from rsrefseg.models.sizes import IGNORE_LABEL

    array = np.asarray(pixels)
    if array.ndim == 2:
        array = np.where(array == IGNORE_LABEL, 96, (array > 0) * 255) if array.dtype == np.uint8 else (array > 0) * 255
    image = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8, copy=False))).convert("RGB")
    return image.resize((tile, tile), resample)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's built-in scalable font (needs FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()
