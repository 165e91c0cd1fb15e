"""Activation checkpointing of the backbone blocks (SAM ViT blocks, SigLIP encoder layers).

The backbones are frozen but carry LoRA adapters, so backward still runs through every block and
each block's activations are kept for it: at 1024 px that is most of a step's memory. With
checkpointing a block keeps only its input and recomputes its forward during backward, trading
about one extra forward of the backbones for a much larger batch on a GPU (measure with
`benchmarks/train_step.py --batch 0`). Off by default: on CPU and at small batches it only costs
time. Gradients are the same as without it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpoint_blocks(blocks: nn.ModuleList) -> int:
    """Recompute each block of `blocks` in backward instead of storing its activations."""
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    return len(blocks)


def use_activation_checkpointing(sam_image_encoder: nn.Module, siglip_model: nn.Module) -> int:
    """Checkpoint SAM's ViT blocks and SigLIP's vision and text encoder layers. Returns how many."""
    return (
        checkpoint_blocks(sam_image_encoder.blocks)
        + checkpoint_blocks(siglip_model.vision_model.encoder.layers)
        + checkpoint_blocks(siglip_model.text_model.encoder.layers)
    )
