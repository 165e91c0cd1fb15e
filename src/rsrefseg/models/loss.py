"""Training loss: weighted binary cross-entropy on mask logits (the paper's loss), plus an
optional Dice term (RSRefSeg-2 trains with cross-entropy + Dice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_bce_loss(logits: torch.Tensor, mask: torch.Tensor, *, pos_weight: float = 1.0) -> torch.Tensor:
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
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)


def mask_dice_loss(logits: torch.Tensor, mask: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Mean over samples of 1 - soft Dice(sigmoid(logits), mask).

    Per sample, so a small object weighs as much as a large one: with BCE alone, predicting
    "nothing" is the cheapest answer for targets of a few percent of the image. `smooth` keeps
    an empty target with an empty prediction at loss 0 (and the gradient finite).

    logits: float [B, H, W]; mask: uint8/bool [B, H, W] (> 0 = foreground) -> scalar
    """
    _check_shapes(logits, mask)
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = (mask > 0).float().flatten(1)
    inter = (prob * target).sum(1)
    dice = (2 * inter + smooth) / (prob.sum(1) + target.sum(1) + smooth)
    return (1 - dice).mean()


def mask_loss(
    logits: torch.Tensor, mask: torch.Tensor, *, bce_weight: float = 1.0, dice_weight: float = 0.0,
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """bce_weight * BCE + dice_weight * Dice (a zero weight skips its term)."""
    loss = logits.new_zeros((), dtype=torch.float32)
    if bce_weight:
        loss = loss + bce_weight * mask_bce_loss(logits, mask, pos_weight=pos_weight)
    if dice_weight:
        loss = loss + dice_weight * mask_dice_loss(logits, mask)
    return loss


def _check_shapes(logits: torch.Tensor, mask: torch.Tensor) -> None:
    if logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in shape")
