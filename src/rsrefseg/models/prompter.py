"""AttnPrompter (RSRefSeg paper, Section II, eq. 3-4): SigLIP features -> SAM prompts.

Activation. The paper writes the activation as a dot product `a = v tᵀ`. With so400m's 1152-dim
features a raw dot product has a scale of hundreds and saturates the sigmoid, so we use SigLIP's
own image-text matching logit instead:

    a = exp(logit_scale) * cos(v, t) + logit_bias

i.e. the dot product of L2-normalized features, scaled and shifted by the temperature and bias
SigLIP learned for its sigmoid loss; σ(a) is then SigLIP's own "does this patch match this text"
probability. Scale and bias are passed in (they belong to the SigLIP checkpoint).

    v_global = v * σ(a(v, t_global)) + v
    v_local  = v * mean over real tokens l of σ(a(v, t_local[l])) + v
    v_attn   = cat(v_global, v_local, v)                       channels 3*d1
    sparse   = flatten(k x [3x3 stride-2 Conv-BN-GELU](conv1x1(v_attn)))   [B, M, d2]
    dense    = SAM mask_downscaling(resize(a_global))           [B, d2, h, w]

`v_local` uses that mean_l(v*σ(a_l)) = v*mean_l(σ(a_l)), so no [B, N, L, d1] tensor is built.

The authors' code (KyanChen/RSRefSeg, `rsris/models/models.py`; `model.variant=official`) differs
in two places, each a switch here:

    gating="official":        v_global = v * σ(a_global)            (no residual)
                              v_local  = (v + v * mean_l σ(a_l)) / 2
                              v_attn   = cat(v_local, v_global, v)
    sparse_branch="official": conv1x1-BN-GELU(v_attn) + SAM's dense positional encoding on the
                              SigLIP grid, the k stride-2 blocks, then a plain 1x1 conv: the
                              tokens are unrestricted, like SAM's own point embeddings.

The dense prompt feeds the global activation *logit* map a_global (before the sigmoid) to SAM's
mask-prompt input, because SAM's mask prompt is itself a logit map (its previous low-res output).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder
from torch import nn


def matching_logits(
    v: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP matching logit of every patch against every text vector.

    v: [B, N, d], t: [B, L, d] -> [B, N, L]
    """
    cos = torch.einsum("bnd,bld->bnl", F.normalize(v, dim=-1), F.normalize(t, dim=-1))
    return cos * logit_scale.exp() + logit_bias


def sparse_token_count(grid: int, downsample_rate: int) -> int:
    """Number M of sparse tokens for a grid x grid feature map: each 3x3 stride-2 conv with
    padding 1 maps n -> ceil(n / 2)."""
    n = grid
    for _ in range(int(math.log2(downsample_rate))):
        n = (n + 1) // 2
    return n * n


class AttnPrompter(nn.Module):
    """SigLIP image/text features -> SAM sparse and dense prompt embeddings."""

    def __init__(
        self,
        *,
        in_dim: int,
        prompt_dim: int,
        downsample_rate: int = 4,
        dense_prompt: bool = True,
        sparse_branch: str = "paper",
        gating: str = "paper",
    ) -> None:
        """
        in_dim:          d1, SigLIP hidden size (1152 for so400m)
        prompt_dim:      d2, SAM prompt embedding size (256 for the official SAM)
        downsample_rate: 2, 4 or 8: the sparse branch has log2(rate) stride-2 blocks
        dense_prompt:    feed the activation map to SAM's mask prompt; off = SAM's no-mask embedding
        sparse_branch:   "paper" or "official" (the authors' code; module docstring)
        gating:          "paper" or "official" (the authors' code; module docstring)
        """
        super().__init__()
        k = int(math.log2(downsample_rate))
        if downsample_rate < 2 or 2**k != downsample_rate:
            raise ValueError(f"downsample_rate must be a power of two >= 2, got {downsample_rate}")
        if sparse_branch not in ("paper", "official") or gating not in ("paper", "official"):
            raise ValueError(f"sparse_branch and gating are paper or official, got {sparse_branch!r}, {gating!r}")
        self.downsample_rate = downsample_rate
        self.dense_prompt = dense_prompt
        self.sparse_branch = sparse_branch
        self.gating = gating
        # Modules are created in the same order for both variants, the official extras last, so
        # a paper-variant build draws exactly the random numbers it always drew.
        self.project = nn.Conv2d(3 * in_dim, prompt_dim, kernel_size=1)
        self.downsample = nn.Sequential(
            *[
                nn.Sequential(
                    # No conv bias: BatchNorm's shift makes it redundant.
                    nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(prompt_dim),
                    nn.GELU(),
                )
                for _ in range(k)
            ]
        )
        if sparse_branch == "official":
            self.project_norm = nn.Sequential(nn.BatchNorm2d(prompt_dim), nn.GELU())
            self.out_proj = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=1)

    def forward(
        self,
        *,
        v: torch.Tensor,
        grid: tuple[int, int],
        t_global: torch.Tensor,
        t_local: torch.Tensor,
        text_mask: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        prompt_encoder: PromptEncoder,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        v:              [B, h1*w1, d1] SigLIP patch features, row-major over `grid` = (h1, w1)
        t_global:       [B, d1]        SigLIP pooled text embedding
        t_local:        [B, L, d1]     SigLIP per-token text features
        text_mask:      [B, L]         1 for real tokens, 0 for padding
        logit_scale:    [1]            SigLIP log temperature
        logit_bias:     [1]            SigLIP matching bias
        prompt_encoder: SAM's prompt encoder (its mask embedding for the dense prompt; its
                        positional encoding for the official sparse branch)
        returns:        sparse [B, M, d2], dense [B, d2, h, w] (h, w = SAM image-embedding size)
        """
        b, n, d = v.shape
        h1, w1 = grid
        if n != h1 * w1:
            raise ValueError(f"v has {n} patches, grid {grid} needs {h1 * w1}")

        a_global = matching_logits(v, t_global.unsqueeze(1), logit_scale, logit_bias)  # [B, N, 1]
        a_local = matching_logits(v, t_local, logit_scale, logit_bias)  # [B, N, L]
        mask = text_mask.to(a_local.dtype).unsqueeze(1)  # [B, 1, L]
        # clamp: an all-padding phrase gives a zero gate instead of NaN.
        gate_local = (torch.sigmoid(a_local) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        if self.gating == "paper":
            v_global = v * torch.sigmoid(a_global) + v
            v_local = v * gate_local + v
            v_attn = torch.cat([v_global, v_local, v], dim=-1)  # [B, N, 3*d1]
        else:
            v_global = v * torch.sigmoid(a_global)
            v_local = (v + v * gate_local) / 2
            v_attn = torch.cat([v_local, v_global, v], dim=-1)

        x = v_attn.transpose(1, 2).reshape(b, 3 * d, h1, w1)
        x = self.project(x)  # [B, d2, h1, w1]
        if self.sparse_branch == "official":
            x = self.project_norm(x) + prompt_encoder.pe_layer((h1, w1)).to(x.dtype).unsqueeze(0)
        x = self.downsample(x)  # [B, d2, h1/r, w1/r]
        if self.sparse_branch == "official":
            x = self.out_proj(x)
        sparse = x.flatten(2).transpose(1, 2)  # [B, M, d2]

        h, w = prompt_encoder.image_embedding_size
        if self.dense_prompt:
            act_map = a_global.transpose(1, 2).reshape(b, 1, h1, w1)
            act_map = F.interpolate(act_map, size=prompt_encoder.mask_input_size, mode="bilinear", align_corners=False)
            dense = prompt_encoder._embed_masks(act_map)  # [B, d2, h, w]
        else:
            # What SAM itself does when no mask prompt is given.
            dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        return sparse, dense
