"""RSRefSeg-2's cascaded second-order prompter: SigLIP 2 features -> SAM 2.1 prompts.

As the authors' code has it (KyanChen/RSRefSeg2, refseg/models/models.py, `CascadedPrompter`
with the operation orders of configs_RSRefSeg2/*): every step is post-norm with a residual,
x = LN(x + Attn(q = x + pe_x, k = y + pe_y, v = y)), followed where the authors have one by
x = LN(x + MLP(x)). Attention projects to an internal width (512) over 8 heads.

    Q1 = Q2 = adaptive average pool of the text tokens (pads included) to 3 queries, each set
              with its own learnable positional embedding
    query blocks (2):  Q1, Q2 self-attend; each cross-attends to the text tokens (+MLP);
                       Q1 cross-attends to Q2, then Q2 to the new Q1 (+MLP each)
    stage one (2):     Q1 self-attends; the image cross-attends to Q1 (+MLP)
    stage two (2):     Q2 self-attends; the image cross-attends to Q2 (+MLP); the prompt tokens
                       self-attend, cross-attend to Q2 (+MLP), then to the image (+MLP)
    sparse prompts:    MLP(d -> mlp -> d) of the prompt tokens (SAM 2.1's sparse embeddings)
    dense prompt:      Conv3x3-BN-GELU-Conv3x3 on the refined image map, bilinear up to SAM's
                       mask-prompt size, cosine with SigLIP's pooled text embedding x
                       exp(logit_scale) + logit_bias (SigLIP's own): a 1-channel mask logit

The image tokens carry a learnable positional embedding of the SigLIP grid. The queries after
the query blocks (not after the stages) feed the loss's decorrelation and contrastive terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rsrefseg.models.presets import PrompterSizes


@dataclass
class Prompts:
    """What the prompter gives the model: SAM 2.1's prompts and the loss's inputs."""

    sparse: torch.Tensor  # [B, P, d]
    dense: Optional[torch.Tensor]  # [B, 1, m, m] mask logits, None without the dense branch
    queries1: torch.Tensor  # [B, Nq, C] after the query blocks
    queries2: torch.Tensor  # [B, Nq, C]


class Attention(nn.Module):
    """Multi-head attention with an internal width of its own (q from `dim`, k/v from `kv_dim`)."""

    def __init__(self, dim: int, kv_dim: int, sizes: PrompterSizes) -> None:
        super().__init__()
        if sizes.internal_dim % sizes.num_heads:
            raise ValueError(f"prompter internal_dim {sizes.internal_dim} must split over {sizes.num_heads} heads")
        self.heads = sizes.num_heads
        self.q_proj = nn.Linear(dim, sizes.internal_dim)
        self.k_proj = nn.Linear(kv_dim, sizes.internal_dim)
        self.v_proj = nn.Linear(kv_dim, sizes.internal_dim)
        self.out_proj = nn.Linear(sizes.internal_dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v)))
        return self.out_proj(out.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](F.gelu(self.layers[0](x)))


class AttendStep(nn.Module):
    """x = LN(x + Attn(x + pe_x, y + pe_y, y)); with `mlp`, then x = LN(x + MLP(x)).
    Self-attention: y is x (and pe_y pe_x)."""

    def __init__(self, dim: int, kv_dim: int, sizes: PrompterSizes, *, mlp: bool) -> None:
        super().__init__()
        self.attn = Attention(dim, kv_dim, sizes)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, sizes.mlp_dim, dim) if mlp else None
        self.mlp_norm = nn.LayerNorm(dim) if mlp else None

    def forward(self, x: torch.Tensor, x_pe, y: Optional[torch.Tensor] = None, y_pe=None) -> torch.Tensor:
        if y is None:
            y, y_pe = x, x_pe
        key = y if y_pe is None else y + y_pe
        x = self.norm(x + self.attn(x if x_pe is None else x + x_pe, key, y))
        if self.mlp is not None:
            x = self.mlp_norm(x + self.mlp(x))
        return x


class QueryBlock(nn.Module):
    """Q1 and Q2 attend to themselves, to the text, then to each other."""

    def __init__(self, dim: int, sizes: PrompterSizes) -> None:
        super().__init__()
        self.self1 = AttendStep(dim, dim, sizes, mlp=False)
        self.self2 = AttendStep(dim, dim, sizes, mlp=False)
        self.text1 = AttendStep(dim, dim, sizes, mlp=True)
        self.text2 = AttendStep(dim, dim, sizes, mlp=True)
        self.cross12 = AttendStep(dim, dim, sizes, mlp=True)
        self.cross21 = AttendStep(dim, dim, sizes, mlp=True)

    def forward(self, q1, q2, pe1, pe2, text):
        q1, q2 = self.self1(q1, pe1), self.self2(q2, pe2)
        q1, q2 = self.text1(q1, pe1, text), self.text2(q2, pe2, text)
        q1 = self.cross12(q1, pe1, q2, pe2)
        q2 = self.cross21(q2, pe2, q1, pe1)
        return q1, q2


class StageBlock(nn.Module):
    """The queries self-attend and the image cross-attends to them; in stage two (`prompt_dim`)
    the prompt tokens then self-attend and cross-attend to the queries and to the image."""

    def __init__(self, dim: int, sizes: PrompterSizes, prompt_dim: int = 0) -> None:
        super().__init__()
        self.query_self = AttendStep(dim, dim, sizes, mlp=False)
        self.image_cross = AttendStep(dim, dim, sizes, mlp=True)
        if prompt_dim:
            self.prompt_self = AttendStep(prompt_dim, prompt_dim, sizes, mlp=False)
            self.prompt_text = AttendStep(prompt_dim, dim, sizes, mlp=True)
            self.prompt_image = AttendStep(prompt_dim, dim, sizes, mlp=True)

    def forward(self, queries, query_pe, image, image_pe, prompts=None, prompt_pe=None):
        queries = self.query_self(queries, query_pe)
        image = self.image_cross(image, image_pe, queries, query_pe)
        if prompts is not None:
            prompts = self.prompt_self(prompts, prompt_pe)
            prompts = self.prompt_text(prompts, prompt_pe, queries, query_pe)
            prompts = self.prompt_image(prompts, prompt_pe, image, image_pe)
        return queries, image, prompts


class CascadedPrompter(nn.Module):
    """SigLIP 2 image tokens and text tokens -> SAM 2.1 sparse and dense prompts (module doc)."""

    def __init__(
        self, *, dim: int, prompt_dim: int, grid: tuple[int, int], sizes: PrompterSizes, text_queries: int = 3,
        query_blocks: int = 2, stage1_blocks: int = 2, stage2_blocks: int = 2, prompt_tokens: int = 9,
        dense_prompt: bool = True,
    ) -> None:
        super().__init__()
        self.text_queries = text_queries
        self.grid = grid
        # Random normal starts, as the authors' nn.Parameter(torch.randn(...)).
        self.query_pe1 = nn.Parameter(torch.randn(text_queries, dim))
        self.query_pe2 = nn.Parameter(torch.randn(text_queries, dim))
        self.image_pe = nn.Parameter(torch.randn(1, dim, *grid))
        self.prompt_embedding = nn.Parameter(torch.randn(prompt_tokens, prompt_dim))
        self.prompt_pe = nn.Parameter(torch.randn(prompt_tokens, prompt_dim))
        self.query_blocks = nn.ModuleList(QueryBlock(dim, sizes) for _ in range(query_blocks))
        self.stage1 = nn.ModuleList(StageBlock(dim, sizes) for _ in range(stage1_blocks))
        self.stage2 = nn.ModuleList(StageBlock(dim, sizes, prompt_dim) for _ in range(stage2_blocks))
        self.sparse_mlp = Mlp(prompt_dim, sizes.mlp_dim, prompt_dim)
        self.dense_conv = nn.Sequential(
            nn.Conv2d(dim, dim // 2, 3, padding=1), nn.BatchNorm2d(dim // 2), nn.GELU(), nn.Conv2d(dim // 2, dim, 3, padding=1),
        ) if dense_prompt else None  # fmt: skip

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_pooled: torch.Tensor, *,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor, mask_size: int) -> Prompts:
        """image: [B, h*w, C] SigLIP tokens (row-major grid); text: [B, L, C] text tokens;
        text_pooled: [B, C] SigLIP's pooled text embedding; mask_size: SAM's mask-prompt side."""
        b = image.shape[0]
        pe1, pe2 = self.query_pe1.expand(b, -1, -1), self.query_pe2.expand(b, -1, -1)
        q1 = F.adaptive_avg_pool1d(text.transpose(1, 2), self.text_queries).transpose(1, 2)
        q2 = q1
        for block in self.query_blocks:
            q1, q2 = block(q1, q2, pe1, pe2, text)
        image_pe = self.image_pe.flatten(2).transpose(1, 2)  # [1, h*w, C]
        refined, r1, r2 = image, q1, q2
        for block in self.stage1:
            r1, refined, _ = block(r1, pe1, refined, image_pe)
        prompts, prompt_pe = self.prompt_embedding.expand(b, -1, -1), self.prompt_pe.expand(b, -1, -1)
        for block in self.stage2:
            r2, refined, prompts = block(r2, pe2, refined, image_pe, prompts, prompt_pe)
        dense = None
        if self.dense_conv is not None:
            dense = self.dense_mask(refined, text_pooled, logit_scale, logit_bias, mask_size)
        return Prompts(sparse=self.sparse_mlp(prompts), dense=dense, queries1=q1, queries2=q2)

    def dense_mask(self, refined: torch.Tensor, text_pooled: torch.Tensor, logit_scale: torch.Tensor,
                   logit_bias: torch.Tensor, mask_size: int) -> torch.Tensor:
        """[B, 1, m, m]: SigLIP's matching logit of every upsampled refined-image position with
        the pooled text. Upsampled before the cosine (the authors' `preup`), so each position's
        feature is normalised at the mask-prompt resolution."""
        b, _, c = refined.shape
        feature_map = refined.transpose(1, 2).reshape(b, c, *self.grid)
        feature_map = self.dense_conv(feature_map)
        feature_map = F.interpolate(feature_map, size=(mask_size, mask_size), mode="bilinear", align_corners=True)
        cosine = torch.einsum("bchw,bc->bhw", F.normalize(feature_map, dim=1), F.normalize(text_pooled, dim=1))
        return (cosine * logit_scale.exp() + logit_bias).unsqueeze(1)
