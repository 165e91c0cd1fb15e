"""Channels-last (NHWC) memory format for the convolutions.

GPU convolution kernels (cuDNN in bf16) are fastest on NHWC tensors; given NCHW they transpose
on the way in and out. With the switch on, the images enter channels-last and the frozen 4-D
weights are stored channels-last: SAM's and SigLIP's patch embeddings and SAM's neck, which are
nearly all of the convolution FLOPs (and SAM's patch embedding, which permutes to [B, H, W, C]
next, then gets a contiguous tensor for free). Same math, different strides; off by default
until measured on a GPU.

Only frozen weights, and only once the model has been wrapped: DeepSpeed's start-up broadcast
views every parameter as bytes (`p.data.view(torch.uint8)`), which fails on NHWC strides, and
ZeRO-2 re-points the trainable parameters into its flat, contiguous buffers anyway. So the model
converts on its first forward (`RSRefSeg.forward`), after `deepspeed.initialize`; frozen
parameters are outside ZeRO's buffers, so giving them new storage is safe.
"""

from __future__ import annotations

import torch
from torch import nn


def use_channels_last(model: nn.Module) -> int:
    """Store every frozen 4-D parameter of `model` channels-last, in place; returns how many."""
    converted = 0
    for param in model.parameters():
        if param.dim() == 4 and not param.requires_grad:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
            converted += 1
    return converted


def as_channels_last(image: torch.Tensor) -> torch.Tensor:
    """An image batch [B, C, H, W] with NHWC strides (same values, same shape)."""
    return image.contiguous(memory_format=torch.channels_last)
