"""Training losses: weighted binary cross-entropy on mask logits (the paper's loss), an optional
Dice term, and RSRefSeg-2's two auxiliary terms (query decorrelation, and a CLIP-style contrastive
loss gathered over every worker's batch).

Mask labels are 0 (background) and any value > 0 (foreground: masks arrive as 0/1 or 0/255),
unless the caller passes `ignore_index`: RSRefSeg-2's letterboxed labels (device_inputs) are 0/1
with IGNORE_LABEL (255) on the padding, which its mask terms then do not count.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F



def mask_bce_loss(logits: torch.Tensor, mask: torch.Tensor, *, pos_weight: float = 1.0,
                  ignore_index: Optional[int] = None) -> torch.Tensor:
    """Mean binary cross-entropy with logits.

    logits:     float [B, H, W]
    mask:       uint8/bool [B, H, W]; any value > 0 is foreground (masks arrive as 0/1 or 0/255)
    pos_weight: weight of foreground pixels (1.0 = plain BCE)
    returns:    scalar loss
    """
    _check_shapes(logits, mask)
    # float32 even for a bf16/fp16 model: the mean over B*H*W pixels loses precision in half types.
    logits = logits.float()
    target = (mask > 0).float()
    weight = None if pos_weight == 1.0 else torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    if ignore_index is None:
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
    valid = mask != ignore_index
    target = target * valid
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def mask_dice_loss(logits: torch.Tensor, mask: torch.Tensor, *, smooth: float = 1.0, exponent: int = 1,
                   ignore_index: Optional[int] = None) -> torch.Tensor:
    """Mean over samples of 1 - soft Dice(sigmoid(logits), mask).

    Per sample, so a small object weighs as much as a large one: with BCE alone, predicting
    "nothing" is the cheapest answer for targets of a few percent of the image. `smooth` keeps
    an empty target with an empty prediction at loss 0 (and the gradient finite). `exponent` 1
    is the plain form (sum p + sum t below); 2 the V-Net form (sum p^2 + sum t^2) that
    RSRefSeg-2's authors train with (mmseg's DiceLoss). `ignore_index` pixels count for neither.

    logits: float [B, H, W]; mask: uint8/bool [B, H, W] (> 0 = foreground) -> scalar
    """
    _check_shapes(logits, mask)
    valid = (mask != ignore_index).float().flatten(1) if ignore_index is not None else 1.0
    prob = torch.sigmoid(logits.float()).flatten(1) * valid
    target = (mask > 0).float().flatten(1) * valid
    inter = (prob * target).sum(1)
    dice = (2 * inter + smooth) / (prob.pow(exponent).sum(1) + target.pow(exponent).sum(1) + smooth)
    return (1 - dice).mean()


def mask_loss(
    logits: torch.Tensor, mask: torch.Tensor, *, bce_weight: float = 1.0, dice_weight: float = 0.0,
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """bce_weight * BCE + dice_weight * Dice (a zero weight skips its term)."""
    return sum(mask_loss_terms(logits, mask, bce_weight=bce_weight, dice_weight=dice_weight,
                               pos_weight=pos_weight).values(), logits.new_zeros((), dtype=torch.float32))


def mask_loss_terms(
    logits: torch.Tensor, mask: torch.Tensor, *, bce_weight: float = 1.0, dice_weight: float = 0.0,
    pos_weight: float = 1.0, dice_exponent: int = 1, ignore_index: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """The weighted mask terms by name ("bce", "dice"); a zero weight leaves its term out."""
    terms = {}
    if bce_weight:
        terms["bce"] = bce_weight * mask_bce_loss(logits, mask, pos_weight=pos_weight, ignore_index=ignore_index)
    if dice_weight:
        terms["dice"] = dice_weight * mask_dice_loss(logits, mask, exponent=dice_exponent, ignore_index=ignore_index)
    return terms


def decorrelation_loss(queries1: torch.Tensor, queries2: torch.Tensor) -> torch.Tensor:
    """mean over the batch of cos^2(mean Q1, mean Q2): pushes RSRefSeg-2's two query sets apart.

    queries1, queries2: [B, N, C] -> scalar
    """
    similarity = F.cosine_similarity(queries1.float().mean(1), queries2.float().mean(1), dim=1)
    return similarity.pow(2).mean()


def gather_with_local_grad(features: torch.Tensor) -> torch.Tensor:
    """[b, C] on each rank -> [world * b, C], rank order; the gradient flows through this rank's
    own slot only (the other ranks' rows are constants here, as in open_clip without
    `gather_with_grad`). Without a process group: `features` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    slots = [torch.zeros_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(slots, features.detach().contiguous())
    slots[dist.get_rank()] = features
    return torch.cat(slots, dim=0)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(CE(image -> text) + CE(text -> image)) / 2 over the batch of every worker: the i-th image
    vector matches the i-th text vector, every other pair in the gathered batch is a negative.

    image, text: [b, C] this worker's vectors (normalised here); log_scale, bias: learnable
    scalars (logit = exp(log_scale) * cos + bias) -> scalar, the same value on every worker.
    Each worker's micro-batch must have the same size (DeepSpeed's fixed micro-batches do).
    """
    image = gather_with_local_grad(F.normalize(image.float(), dim=1))
    text = gather_with_local_grad(F.normalize(text.float(), dim=1))
    logits = log_scale.float().exp() * image @ text.t() + bias.float()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _check_shapes(logits: torch.Tensor, mask: torch.Tensor) -> None:
    if logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in shape")
