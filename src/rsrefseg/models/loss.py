"""Training loss: binary cross-entropy on mask logits (the paper's loss)."""

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
    if logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in shape")
    # float32 even for a bf16/fp16 model: the mean over B*H*W pixels loses precision in half types.
    logits = logits.float()
    target = (mask > 0).float()
    weight = None if pos_weight == 1.0 else torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
