"""The one forward -> score -> gallery path of validation, evaluation and batch inference.

Training's per-epoch validation (a DeepSpeed engine on a Ray Train worker), `rsrefseg evaluate`
(model replicas in Ray Data actors, and its gallery pass) all call `score` on a batch of the data
pipeline, so they can never disagree on what a prediction or a metric is. `predict` and the
MLflow model run the same `predict_logits` on images without masks (`inference.scenes`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from rsrefseg.models.device_inputs import TEXT_COLUMNS, crop_valid, model_batch
from rsrefseg.models.metrics import sample_records

MODEL_INPUTS = ("sam_image", "siglip_image", "input_ids", "attention_mask")


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS}


@torch.no_grad()
def predict_logits(forward: Callable, batch: dict, device: torch.device | str, *, autocast: Optional[torch.dtype] = None) -> torch.Tensor:
    """float32 [B, label, label] on `device`: the mask logits of `forward` (a model or a DeepSpeed
    engine). `autocast`: a dtype to run the forward in (bf16 on a GPU)."""
    device = torch.device(device)
    inputs = model_inputs(to_device(batch, device))
    with autocast_context(device, autocast):
        logits = forward(**inputs)
    return logits.float()


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    """torch.autocast to `dtype` on `device`'s type (bf16 on a GPU); no autocast when None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def inference_device(prefer_gpu: bool = True) -> tuple[torch.device, Optional[torch.dtype]]:
    """The device to predict on (the GPU when there is one) and its autocast dtype (bf16 there)."""
    if prefer_gpu and torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


def score_batch(logits: torch.Tensor, batch: dict, *, empty_iou: float = 1.0) -> dict[str, list]:
    """Per-sample records (metrics.sample_records) of one batch of `device_inputs.model_batch`,
    with its id, phrase and category.

    When the batch carries `mask_original` (model_batch(originals=True)), each sample is scored
    at its image's own size: its logits (a letterboxed sample's image area of them) resized there
    (bilinear), thresholded at 0, and compared with the true mask, as the field's evaluation code
    does. Otherwise at the label size (a letterboxed sample: its image area there).
    """
    logits = logits.float()
    originals = batch.get("mask_original")
    if originals is None and batch.get("valid") is not None:  # letterboxed: the image areas
        originals = crop_valid(torch.as_tensor(batch["mask"]), batch["valid"])
    if originals is None:
        records = sample_records((logits > 0).cpu(), torch.as_tensor(batch["mask"]).cpu(), empty_iou=empty_iou)
    else:
        records: dict[str, list] = {}
        # A letterboxed sample's image area first (its padding is no part of the image).
        for logit, gt in zip(crop_valid(logits, batch.get("valid")), originals):
            gt = torch.as_tensor(gt)[None]
            pred = F.interpolate(logit[None, None], size=gt.shape[1:], mode="bilinear", align_corners=False)[0] > 0
            for key, values in sample_records(pred.cpu(), gt.cpu(), empty_iou=empty_iou).items():
                records.setdefault(key, []).extend(values)
    for name in TEXT_COLUMNS:
        values = batch.get(name)
        records[name] = [str(v) for v in values] if values is not None else [""] * logits.shape[0]
    return records


def score(forward: Callable, batch: dict, sizes, device: torch.device | str, *,
          autocast: Optional[torch.dtype] = None, empty_iou: float = 1.0, gallery=None) -> dict[str, list]:
    """Per-sample records of one batch of the data pipeline: made model-ready at `sizes` on
    `device` (the original masks kept, so each sample is scored at its image's own size), the
    forward of `forward` (a model or a DeepSpeed engine), the scores, and the batch offered to
    `gallery` (an `inference.gallery.Gallery`, or None)."""
    tensors = model_batch(batch, sizes, device, originals=True)
    logits = predict_logits(forward, tensors, device, autocast=autocast)
    records = score_batch(logits, tensors, empty_iou=empty_iou)
    if gallery is not None:
        gallery.offer(tensors, logits > 0, records["iou"])
    return records
