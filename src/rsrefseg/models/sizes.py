"""Sizes: of the backbones (a preset's SAM and SigLIP) and of the inputs the data pipeline gives
the model (the contract between the two). Plain dataclasses, no torch: the driver and the data
pipeline read them without importing the model libraries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputSizes:
    """Square sizes, in pixels, of what one sample becomes before it reaches the model.

    sam_image:    SAM image-encoder input (1024 for the paper's ViT-B/L).
    siglip_image: SigLIP vision input (384 for so400m-patch14-384).
    label:        mask resolution at which loss and metrics are computed.
    max_text_len: phrase tokens, padded/truncated to this length (SigLIP uses 64).
    """

    sam_image: int
    siglip_image: int
    label: int
    max_text_len: int


@dataclass(frozen=True)
class SamSizes:
    """Every size of a SAM model. The official values are in `rsrefseg.models.presets`."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    prompt_embed_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    decoder_num_heads: int
    iou_head_hidden_dim: int

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding (64 for the official 1024 px / patch 16)."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4x the embedding, 256 officially)."""
        return 4 * self.embedding_size


@dataclass(frozen=True)
class SiglipSizes:
    """Every size of a SigLIP model. Vision and text share `hidden_size`, as the prompter needs."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    vision_layers: int
    text_layers: int
    vocab_size: int
    max_text_len: int

    @property
    def grid(self) -> int:
        """Side of the patch-feature map (27 for 384 px / patch 14)."""
        return self.image_size // self.patch_size
