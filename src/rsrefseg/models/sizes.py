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
    keep_ratio:   False: every image is stretched to the square (RSRefSeg). True: resized to fit
                  the square with its aspect ratio kept and padded at the bottom/right (RSRefSeg-2:
                  pixels pad with 0, the label with IGNORE_LABEL, which loss and scoring skip).
    """

    sam_image: int
    siglip_image: int
    label: int
    max_text_len: int
    keep_ratio: bool = False


    def shrunk_shape(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) an image of this size travels at from the data pipeline: itself when it
        fits the SAM input, else shrunk to it, to the square (stretched) or, with keep_ratio, to
        fit inside it with its aspect kept (what the device-side letterbox then pads)."""
        side = self.sam_image
        if max(height, width) <= side:
            return height, width
        return fit_inside(height, width, side) if self.keep_ratio else (side, side)


def fit_inside(height: int, width: int, size: int) -> tuple[int, int]:
    """(rows, cols) of a height x width image resized to fit a size x size square, aspect kept."""
    scale = size / max(height, width)
    return max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))


# Label value of padding pixels (keep_ratio): neither foreground nor background.
IGNORE_LABEL = 255


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


@dataclass(frozen=True)
class Sam2Sizes:
    """Every size of a SAM 2.1 model (Meta's `sam2` code: a Hiera trunk, an FPN neck, SAM's
    prompt encoder and a mask decoder that also reads the two high-resolution FPN levels).
    The official values are in `rsrefseg.models.presets`."""

    img_size: int
    embed_dim: int  # Hiera's first-stage width; it doubles at each of the 3 later stages
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    d_model: int  # the neck's and the prompt encoder's / mask decoder's width (256 officially)
    decoder_depth: int
    decoder_mlp_dim: int
    decoder_num_heads: int
    iou_head_hidden_dim: int
    mask_in_chans: int = 16

    @property
    def backbone_channel_list(self) -> tuple[int, ...]:
        """The trunk's stage widths, deepest first (what the FPN neck reads)."""
        return tuple(self.embed_dim * 2**i for i in reversed(range(len(self.stages))))

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding: stride 16 (64 at 1024 px)."""
        return self.img_size // 16

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's mask logits (4x the embedding, 256 officially)."""
        return 4 * self.embedding_size
