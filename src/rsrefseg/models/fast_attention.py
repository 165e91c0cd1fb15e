"""SAM's ViT attention through `torch.nn.functional.scaled_dot_product_attention`.

segment-anything's `Attention.forward` materialises the full [B*heads, N, N] score matrix, adds
the decomposed relative-position bias, then softmaxes: three passes over N^2 memory per block
(N = 4096 tokens in SAM's global-attention blocks at 1024 px). SDPA takes the bias as an additive
`attn_mask` and runs one fused kernel (memory-efficient attention on GPU), so the scores are never
written out in fp32. The math is the same; `model.sdpa_attention: false` restores the original.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The additive bias segment-anything's `add_decomposed_rel_pos` adds to the scores.

    q: [B*heads, H*W, C] (unscaled). Returns [B*heads, H*W, H*W] in q's dtype.
    """
    h, w = size
    r_h = get_rel_pos(h, h, rel_pos_h)  # [h, h, C]
    r_w = get_rel_pos(w, w, rel_pos_w)  # [w, w, C]
    bn, _, dim = q.shape
    r_q = q.reshape(bn, h, w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h)  # [B*heads, h, w, h]
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w)  # [B*heads, h, w, w]
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(bn, h * w, h * w)


def _sdpa_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, heads, N, C]
    bias = None
    if self.use_rel_pos:
        bias = decomposed_rel_pos_bias(q.reshape(b * self.num_heads, h * w, -1), self.rel_pos_h, self.rel_pos_w, (h, w))
        bias = bias.view(b, self.num_heads, h * w, h * w).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def use_sdpa_attention(image_encoder: nn.Module) -> int:
    """Route every SAM attention block of `image_encoder` through SDPA. Returns how many."""
    n = 0
    for module in image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_sdpa_forward, module)
            n += 1
    return n
