"""SAM's ViT attention through `torch.nn.functional.scaled_dot_product_attention`.

segment-anything's `Attention.forward` materialises the full [B*heads, N, N] score matrix, adds
the decomposed relative-position bias, then softmaxes: three passes over N^2 memory per block
(N = 4096 tokens in SAM's global-attention blocks at 1024 px). SDPA takes the bias as an additive
`attn_mask` and runs one fused kernel (memory-efficient attention on GPU), so the scores are never
written out in fp32. The math is the same; `model.sdpa_attention: false` restores the original.

With `model.fold_rel_pos` the bias is not materialised at all. It is a sum of two dot products of
each query with a table indexed by the key's row and column,

    bias[i, j] = q_i . R_h[row(i), row(j)] + q_i . R_w[col(i), col(j)],

so it folds into the attention's own q.k: append to each scaled query its h row terms and w
column terms, and to each key the one-hot codes of its row and column. SDPA then sees no
`attn_mask`, and on GPU a fused kernel keeps the scores on chip: no [B, heads, N, N] bias is written
in forward, and none (nor its gradient) is read and written in backward. The q/k head dimension
grows from 64 to 64 + h + w (192 in SAM's global blocks, 92 in its 14x14 windows, padded to a
multiple of 8); v keeps its size.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's row and column terms of segment-anything's decomposed relative-position bias.

    q: [..., H*W, C] (unscaled). Returns rel_h [..., H, W, H] and rel_w [..., H, W, W]: the bias
    of query (y, x) towards key (ky, kx) is rel_h[..., y, x, ky] + rel_w[..., y, x, kx]."""
    h, w = size
    r_q = q.reshape(*q.shape[:-2], h, w, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, get_rel_pos(h, h, rel_pos_h))
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, get_rel_pos(w, w, rel_pos_w))
    return rel_h, rel_w


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The additive bias segment-anything's `add_decomposed_rel_pos` adds to the scores.

    q: [B*heads, H*W, C] (unscaled). Returns [B*heads, H*W, H*W] in q's dtype.
    """
    h, w = size
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(q.shape[0], h * w, h * w)


def split_heads(self: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, H, W, dim] -> q, k, v [B, heads, H*W, C], as segment-anything's `Attention` splits them."""
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def merge_heads(self: Attention, out: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Attention output [B, heads, H*W, C] -> the block's output [B, H, W, dim]."""
    h, w = size
    out = out.view(out.shape[0], self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(out.shape[0], h, w, -1)
    return self.proj(out)


def _sdpa_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    q, k, v = split_heads(self, x)
    bias = None
    if self.use_rel_pos:
        bias = decomposed_rel_pos_bias(q.reshape(b * self.num_heads, h * w, -1), self.rel_pos_h, self.rel_pos_w, (h, w))
        bias = bias.view(b, self.num_heads, h * w, h * w).to(q.dtype)
    return merge_heads(self, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale), (h, w))


def folded_rel_pos_qk(
    q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
    size: tuple[int, int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, heads, H*W, C] -> (q', k') with q' . k' = scale * q . k + decomposed rel-pos bias.

    The extra columns are zero-padded to a multiple of 8 (what the fused kernels need)."""
    h, w = size
    b, heads, n, dim = q.shape
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    # Key j = (row, col) gets one-hot row and column codes that pick its entries of rel_h, rel_w.
    rows = torch.arange(n, device=q.device) // w
    cols = torch.arange(n, device=q.device) % w
    codes = torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], dim=-1).to(k.dtype)  # [N, h + w]
    pad = -(dim + h + w) % 8
    q_folded = F.pad(torch.cat([q * scale, rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w)], dim=-1),
                     (0, pad))
    k_folded = F.pad(torch.cat([k, codes.expand(b, heads, n, h + w)], dim=-1), (0, pad))
    return q_folded, k_folded


def _sdpa_folded_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    _, h, w, _ = x.shape
    q, k, v = split_heads(self, x)
    q, k = folded_rel_pos_qk(q, k, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
    return merge_heads(self, F.scaled_dot_product_attention(q, k, v, scale=1.0), (h, w))


def use_sdpa_attention(image_encoder: nn.Module, fold_rel_pos: bool = False) -> int:
    """Route every SAM attention block of `image_encoder` through SDPA (with the relative-position
    bias folded into q/k where `fold_rel_pos` and the block has one). Returns how many."""
    n = 0
    for module in image_encoder.modules():
        if isinstance(module, Attention):
            forward = _sdpa_folded_forward if fold_rel_pos and module.use_rel_pos else _sdpa_forward
            module.forward = types.MethodType(forward, module)
            n += 1
    return n
