"""RSRefSeg-2: SigLIP 2 -> the cascaded prompter -> SAM 2.1, composed by injection, and its builder.

The authors' model (KyanChen/RSRefSeg2, TGRS 2025; docs: ../shared/DESIGN.md, "RSRefSeg-2"):
SigLIP 2 encodes the letterboxed canvas at 512 px and the phrase; the cascaded prompter
(models/cascaded_prompter.py) turns both into nine sparse prompt tokens and a dense mask logit;
SAM 2.1 encodes the canvas at 1024 px and decodes one mask from those prompts with its two
high-resolution feature levels. It takes the inputs RSRefSeg takes and returns its logits, so
everything downstream serves both (models/build.py).

The loss (`loss_terms`): BCE and V-Net Dice on the mask (padding ignored), the decorrelation of
the two query sets, and a CLIP-style contrastive term between the SigLIP map pooled under the
true mask and the mean of Q2, over the batch of every worker (models/loss.py), each weighted by
its own config key and logged by name.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rsrefseg.models.cascaded_prompter import CascadedPrompter
from rsrefseg.models.lora import apply_lora_rsrefseg2
from rsrefseg.models.loss import contrastive_loss, decorrelation_loss, mask_loss_terms
from rsrefseg.models.presets import build_backbones2, input_sizes, model_preset
from rsrefseg.models.sam2 import Sam2Backbone
from rsrefseg.models.siglip import SiglipEncoder
from rsrefseg.models.sizes import IGNORE_LABEL, InputSizes
from rsrefseg.models.trainable import TrainableWeights
from rsrefseg.platform.config import ModelConfig, Rsrefseg2Config


class RSRefSeg2(TrainableWeights):
    """Referring segmentation, RSRefSeg-2: an image and a phrase in, mask logits out."""

    def __init__(self, *, siglip: SiglipEncoder, sam: Sam2Backbone, prompter: CascadedPrompter, sizes: InputSizes,
                 cfg: Rsrefseg2Config, bce_weight: float, dice_weight: float) -> None:
        super().__init__()
        self.siglip = siglip
        self.sam = sam
        self.prompter = prompter
        self.sizes = sizes
        self.cfg = cfg
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        # The contrastive term's own temperature and bias (the authors' logit_scale2 / logit_bias2),
        # shape [1] as SigLIP's: DeepSpeed's broadcast of the model cannot view a 0-dim tensor.
        self.contrast_log_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
        self.contrast_bias = nn.Parameter(torch.tensor([math.log(0.5)]))

    def forward(self, sam_image: torch.Tensor, siglip_image: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, return_aux: bool = False):
        """
        sam_image:      uint8 [B, 3, S, S]  the letterboxed RGB canvas at SAM 2.1's input size
        siglip_image:   uint8 [B, 3, s, s]  the same canvas at SigLIP 2's input size
        input_ids:      int64 [B, L]        phrase tokens, padded to max_length
        attention_mask: int64 [B, L]        1 = a real token; with text_padding=longest the
                                            tokens are trimmed to the batch's longest phrase (the
                                            authors' padding=True). The text tower itself runs
                                            unmasked and the queries pool every position left,
                                            pads included, as in the authors' code
        returns:        float [B, label, label] mask logits; with `return_aux`, (logits, the
                        loss's inputs: queries1, queries2, image_map)
        """
        # The steps in the order they always ran, so a training step draws the same random numbers.
        tokens = self._encode_siglip_image(siglip_image)  # [B, h*w, C]
        prompts = self._prompts(tokens, self.encode_text(input_ids, attention_mask))
        logits = self._masks(self._encode_sam_image(sam_image), prompts)
        if not return_aux:
            return logits
        b, _, c = tokens.shape
        image_map = tokens.transpose(1, 2).reshape(b, c, *self.siglip.grid)
        return logits, {"queries1": prompts.queries1, "queries2": prompts.queries2, "image_map": image_map}

    def encode_images(self, sam_image: torch.Tensor, siglip_image: torch.Tensor) -> dict:
        """The phrase-independent half of `forward` (both image encoders, the expensive part):
        computed once per image, then `decode`d for each phrase. Same inputs as `forward`."""
        return {"siglip": self._encode_siglip_image(siglip_image), "sam": self._encode_sam_image(sam_image)}

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The phrase's half: (pooled [B, C], per token [B, L, C]) of SigLIP 2's text tower, the
        tokens trimmed as `forward` trims them (text_padding=longest)."""
        if self.cfg.text_padding == "longest":
            input_ids = input_ids[:, : max(1, int(attention_mask.sum(1).max()))]
        return self.siglip.encode_text(input_ids)

    def decode(self, images: dict, text: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mask logits [B, label, label] of `encode_images`' and `encode_text`'s outputs: the
        cascaded prompter and SAM 2.1's mask decoder, the same computation as `forward`'s."""
        return self._masks(images["sam"], self._prompts(images["siglip"], text))

    def _encode_siglip_image(self, siglip_image: torch.Tensor) -> torch.Tensor:
        return self.siglip.encode_image(self.siglip.normalize(siglip_image))

    def _encode_sam_image(self, sam_image: torch.Tensor) -> tuple:
        return self.sam.encode(self.sam.normalize(sam_image))  # (embedding, high-resolution levels)

    def _prompts(self, tokens: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor]):
        text_pooled, text_tokens = text  # [B, C], [B, L, C]
        return self.prompter(
            tokens, text_tokens, text_pooled, logit_scale=self.siglip.logit_scale, logit_bias=self.siglip.logit_bias,
            mask_size=self.sam.sam_prompt_encoder.mask_input_size[0],
        )

    def _masks(self, sam_encoding: tuple, prompts) -> torch.Tensor:
        embedding, high_res = sam_encoding
        low_res = self.sam.decode(embedding, high_res, prompts.sparse, prompts.dense)  # [B, 1, 4h, 4w]
        label = self.sizes.label
        return F.interpolate(low_res, size=(label, label), mode="bilinear", align_corners=False)[:, 0]

    def loss_terms(self, logits: torch.Tensor, mask: torch.Tensor, aux: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """The weighted loss terms by name: bce, dice, decorrelation, contrastive (a zero weight,
        or no `aux`, leaves a term out). mask: uint8 [B, label, label] 0/1, 255 = padding."""
        terms = mask_loss_terms(logits, mask, bce_weight=self.bce_weight, dice_weight=self.dice_weight, dice_exponent=2,
                                ignore_index=IGNORE_LABEL)
        if aux is None:
            return terms
        if self.cfg.decorrelation_weight:
            terms["decorrelation"] = self.cfg.decorrelation_weight * decorrelation_loss(aux["queries1"], aux["queries2"])
        if self.cfg.contrastive_weight:
            pooled = masked_mean(aux["image_map"], mask)
            text = aux["queries2"].mean(1)
            terms["contrastive"] = self.cfg.contrastive_weight * contrastive_loss(
                pooled, text, self.contrast_log_scale, self.contrast_bias)
        return terms

    def loss(self, logits: torch.Tensor, mask: torch.Tensor, aux: Optional[dict] = None) -> torch.Tensor:
        """The sum of `loss_terms`."""
        return sum(self.loss_terms(logits, mask, aux).values(), logits.new_zeros((), dtype=torch.float32))


def masked_mean(feature_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] features, [B, H, W] labels -> [B, C]: the mean over the grid of the features
    under the foreground, the label brought to the grid as the authors do (bilinear, corners
    aligned, > 0.5). Unlike their code, padding (255) counts as background, not foreground.
    An empty mask gives a zero vector (its contrastive logits are then the bias alone)."""
    foreground = (mask == 1).float().unsqueeze(1)
    on_grid = F.interpolate(foreground, size=feature_map.shape[-2:], mode="bilinear", align_corners=True) > 0.5
    return (feature_map.float() * on_grid).mean(dim=(2, 3))


def build_rsrefseg2(model_cfg: ModelConfig, label_size: int = 0, *, random_init: bool = False,
                    gpu: bool = False) -> RSRefSeg2:
    """Build RSRefSeg-2 for a config: backbones (loaded or random), LoRA, prompter, freezing.

    As `build_rsrefseg`: every random draw comes from a private RNG stream seeded with
    `model.init_seed` (tiny checkpoints rebuild their frozen backbones from it); `random_init`
    skips the weight files (speed measurements only); `gpu` is unused (RSRefSeg-2 has no
    device-dependent switches yet)."""
    del gpu
    model_cfg = model_cfg.resolved()
    preset = model_preset(model_cfg)
    options = model_cfg.rsrefseg2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.init_seed)
        siglip_model, sam = build_backbones2(model_cfg, random_init=random_init)
        siglip_model.requires_grad_(False)
        sam.requires_grad_(False)
        apply_lora_rsrefseg2(sam2_image_encoder=sam.image_encoder, siglip_vision=siglip_model.vision_model,
                             siglip_text=siglip_model.text_model, cfg=model_cfg.lora)
        _train_heads(sam, siglip_model, dense_prompt=options.dense_prompt,
                     prompt_encoder=model_cfg.train_prompt_encoder)
        siglip = SiglipEncoder(model=siglip_model)
        prompter = CascadedPrompter(
            dim=preset.siglip.hidden_size, prompt_dim=preset.sam.d_model, grid=siglip.grid, sizes=preset.prompter,
            text_queries=options.text_queries, query_blocks=options.query_blocks, stage1_blocks=options.stage1_blocks,
            stage2_blocks=options.stage2_blocks, prompt_tokens=options.prompt_tokens, dense_prompt=options.dense_prompt,
        )
        model = RSRefSeg2(siglip=siglip, sam=sam, prompter=prompter, sizes=input_sizes(model_cfg, label_size),
                          cfg=options, bce_weight=model_cfg.bce_weight, dice_weight=model_cfg.dice_weight)
    return model


def _train_heads(sam: Sam2Backbone, siglip_model: nn.Module, *, dense_prompt: bool, prompt_encoder: bool) -> None:
    """What trains besides LoRA: SAM 2.1's mask decoder, `no_mem_embed` and (model.train_prompt_encoder,
    on as the authors have it) the prompt encoder (only what the forward uses gets a gradient, so
    only that trains), and SigLIP's logit scale and bias, which score the
    dense prompt. Without the dense branch, the pooled text and those two are unused: the text
    head's LoRA is frozen again so every trainable parameter gets a gradient."""
    sam.sam_mask_decoder.requires_grad_(True)
    sam.no_mem_embed.requires_grad_(True)  # outside the LoRA-wrapped encoder, it trains there too
    for p in sam.unused_decoder_parameters():
        p.requires_grad_(False)
    encoder = sam.sam_prompt_encoder
    (encoder.mask_downscaling if dense_prompt else encoder.no_mask_embed).requires_grad_(prompt_encoder)
    siglip_model.logit_scale.requires_grad_(dense_prompt)
    siglip_model.logit_bias.requires_grad_(dense_prompt)
    if not dense_prompt:
        siglip_model.text_model.head.requires_grad_(False)
