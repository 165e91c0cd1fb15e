"""RSRefSeg: SigLIP -> AttnPrompter -> SAM, composed by injection, and its builder."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rsrefseg.models.activation_checkpointing import use_activation_checkpointing
from rsrefseg.models.channels_last import as_channels_last, use_channels_last
from rsrefseg.models.compiled_backbones import compile_backbones
from rsrefseg.models.fast_attention import use_sdpa_attention
from rsrefseg.models.lora import apply_lora
from rsrefseg.models.loss import mask_loss, mask_loss_terms
from rsrefseg.models.presets import build_backbones, input_sizes, model_preset
from rsrefseg.models.prompter import AttnPrompter
from rsrefseg.models.sam import BatchedSam
from rsrefseg.models.siglip import SiglipEncoder
from rsrefseg.models.trainable import TrainableWeights
from rsrefseg.models.sizes import InputSizes
from rsrefseg.platform.config import ModelConfig


class RSRefSeg(TrainableWeights):
    """Referring segmentation: an image and a phrase in, mask logits out."""

    def __init__(
        self,
        *,
        siglip: SiglipEncoder,
        sam: BatchedSam,
        prompter: AttnPrompter,
        sizes: InputSizes,
        bce_pos_weight: float = 1.0,
        bce_weight: float = 1.0,
        dice_weight: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.siglip = siglip
        self.sam = sam
        self.prompter = prompter
        self.sizes = sizes
        self.bce_pos_weight = bce_pos_weight
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.channels_last = channels_last
        self._weights_channels_last = False

    def forward(
        self,
        sam_image: torch.Tensor,
        siglip_image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        return_aux: bool = False,
    ):
        """
        sam_image:      uint8 [B, 3, S, S]  RGB at SAM's input size
        siglip_image:   uint8 [B, 3, s, s]  RGB at SigLIP's input size
        input_ids:      int64 [B, L]        phrase tokens, padded to max_length
        attention_mask: int64 [B, L]        1 = real token
        returns:        float [B, label, label] mask logits (threshold at 0); with `return_aux`,
                        (logits, {}) as RSRefSeg-2's forward returns (logits, its loss inputs)
        """
        sam_image, siglip_image = self._image_layout(sam_image, siglip_image)
        # The steps in the order they always ran, so a training step draws the same random numbers.
        v = self._encode_siglip_image(siglip_image)
        sparse, dense = self._prompts(v, self.encode_text(input_ids, attention_mask))
        logits = self._masks(self._encode_sam_image(sam_image), sparse, dense)
        return (logits, {}) if return_aux else logits

    def encode_images(self, sam_image: torch.Tensor, siglip_image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The phrase-independent half of `forward` (both image encoders, the expensive part):
        computed once per image, then `decode`d for each phrase. Same inputs as `forward`."""
        sam_image, siglip_image = self._image_layout(sam_image, siglip_image)
        return {"siglip": self._encode_siglip_image(siglip_image), "sam": self._encode_sam_image(sam_image)}

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The phrase's half: SigLIP's text tower, batch-for-batch with the images it will meet."""
        t_global, t_local = self.siglip.encode_text(input_ids)  # [B, d1], [B, L, d1]
        return {"global": t_global, "local": t_local, "mask": attention_mask}

    def decode(self, images: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mask logits [B, label, label] of `encode_images`' and `encode_text`'s outputs: the
        prompter and SAM's mask decoder, the same computation as `forward`'s."""
        sparse, dense = self._prompts(images["siglip"], text)
        return self._masks(images["sam"], sparse, dense)

    def _image_layout(self, sam_image: torch.Tensor, siglip_image: torch.Tensor):
        if self.channels_last:
            if not self._weights_channels_last:  # first call: after DeepSpeed took the model
                use_channels_last(self)
                self._weights_channels_last = True
            sam_image, siglip_image = as_channels_last(sam_image), as_channels_last(siglip_image)
        return sam_image, siglip_image

    def _encode_siglip_image(self, siglip_image: torch.Tensor) -> torch.Tensor:
        return self.siglip.encode_image(self.siglip.normalize(siglip_image))  # [B, h1*w1, d1]

    def _encode_sam_image(self, sam_image: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(self.sam.normalize(sam_image))  # [B, d2, h, w]

    def _prompts(self, v: torch.Tensor, text: dict[str, torch.Tensor]):
        return self.prompter(
            v=v,
            grid=self.siglip.grid,
            t_global=text["global"],
            t_local=text["local"],
            text_mask=text["mask"],
            logit_scale=self.siglip.logit_scale,
            logit_bias=self.siglip.logit_bias,
            prompt_encoder=self.sam.prompt_encoder,
        )

    def _masks(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        low_res = self.sam.decode_masks(image_embeddings, sparse, dense)  # [B, 1, 4h, 4w]
        label = self.sizes.label
        return F.interpolate(low_res, size=(label, label), mode="bilinear", align_corners=False)[:, 0]

    def loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """logits: float [B, H, W]; mask: uint8/bool [B, H, W] (> 0 = foreground) -> scalar
        bce_weight * BCE + dice_weight * Dice."""
        return mask_loss(
            logits, mask, bce_weight=self.bce_weight, dice_weight=self.dice_weight, pos_weight=self.bce_pos_weight
        )

    def loss_terms(self, logits: torch.Tensor, mask: torch.Tensor, aux: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """The weighted loss terms by name ("bce", "dice"); their sum is `loss`. RSRefSeg has no
        auxiliary outputs, so `aux` is unused."""
        return mask_loss_terms(logits, mask, bce_weight=self.bce_weight, dice_weight=self.dice_weight,
                               pos_weight=self.bce_pos_weight)


def build_rsrefseg(
    model_cfg: ModelConfig, label_size: int = 0, *, random_init: bool = False, gpu: bool = False
) -> RSRefSeg:
    """Build RSRefSeg for a config: backbones (loaded or random), LoRA, prompter, freezing.

    Every random draw (tiny backbones, LoRA and prompter init) comes from a private RNG stream
    seeded with `model_cfg.init_seed`, so two builds are identical and the global torch RNG is
    left untouched (tiny checkpoints hold only trainable weights and rely on this).
    `label_size` overrides the preset's mask resolution (0 = preset default); `random_init`
    skips the weight files of the real presets (for speed measurements, never for training).
    `gpu` says where the model will run, which decides the `auto` speed switches.
    The keys `model.variant` decides (paper text or the authors' code) are resolved here.
    """
    model_cfg = model_cfg.resolved().on_device(gpu)
    preset = model_preset(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.init_seed)
        siglip_model, sam = build_backbones(model_cfg, random_init=random_init)
        siglip_model.requires_grad_(False)
        sam.requires_grad_(False)
        apply_lora(
            sam_image_encoder=sam.image_encoder,
            siglip_vision=siglip_model.vision_model,
            siglip_text=siglip_model.text_model,
            cfg=model_cfg.lora,
        )
        if model_cfg.sdpa_attention:
            use_sdpa_attention(sam.image_encoder, fold_rel_pos=model_cfg.fold_rel_pos)
        if model_cfg.activation_checkpointing:
            use_activation_checkpointing(sam.image_encoder, siglip_model)
        if model_cfg.compile_backbones:
            compile_backbones(sam.image_encoder, siglip_model)
        # The mask decoder trains, except what single-mask decoding never uses.
        sam.mask_decoder.requires_grad_(True)
        for p in sam.unused_decoder_parameters():
            p.requires_grad_(False)
        if model_cfg.train_prompt_encoder:
            # The authors' code trains SAM's prompt encoder. Our prompts never pass through its
            # point embeddings, so only the dense-prompt path the forward takes can learn.
            encoder = sam.prompt_encoder
            used = encoder.mask_downscaling if model_cfg.prompter.dense_prompt else encoder.no_mask_embed
            used.requires_grad_(True)
        prompter = AttnPrompter(
            in_dim=preset.siglip.hidden_size,
            prompt_dim=preset.sam.prompt_embed_dim,
            downsample_rate=model_cfg.prompter.downsample_rate,
            dense_prompt=model_cfg.prompter.dense_prompt,
            sparse_branch=model_cfg.prompter.sparse_branch,
            gating=model_cfg.prompter.gating,
        )
    return RSRefSeg(
        siglip=SiglipEncoder(model=siglip_model),
        sam=sam,
        prompter=prompter,
        sizes=input_sizes(model_cfg, label_size),
        bce_pos_weight=model_cfg.bce_pos_weight,
        bce_weight=model_cfg.bce_weight,
        dice_weight=model_cfg.dice_weight,
        channels_last=model_cfg.channels_last,
    )
