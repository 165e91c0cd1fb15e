"""SAM, built from segment-anything's own classes with every size a parameter.

`build_sam(SamSizes(...))` gives the official ViT-B / ViT-L layouts (state-dict keys identical to
`segment_anything.sam_model_registry`, so the official `.pth` files load with `strict=True`) and
the toy layout of the `tiny` preset from the same code.

`BatchedSam.decode_masks` decodes one prompt set per image for a whole batch at once.
segment-anything's `MaskDecoder.predict_masks` assumes ONE image and many prompts
(`repeat_interleave` of the image embedding per prompt), so a batch would need a Python loop;
here the same math runs batched on the decoder's own submodules.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from rsrefseg.models.errors import ModelLoadError, state_dict_problems
from rsrefseg.models.sizes import SamSizes
from rsrefseg.models.weight_files import load_tensors, require_file

# SAM normalizes 0-255 RGB with ImageNet statistics (segment_anything.modeling.Sam defaults).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

SAM_CHECKPOINTS_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


class BatchedSam(Sam):
    """segment-anything's `Sam` plus a batched single-mask decoding path.

    A subclass adds no parameters, so state-dict keys stay those of `sam_model_registry`.
    """

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [B,3,S,S] -> normalized float [B,3,S,S] in the encoder's dtype.

        Inputs are already resized to a square `img_size`, so SAM's padding step is not needed.
        """
        x = (image.float() - self.pixel_mean.float()) / self.pixel_std.float()
        return x.to(self.image_encoder.patch_embed.proj.weight.dtype)

    def decode_masks(
        self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """Decode one prompt set per image, first mask output only (multimask_output=False).

        image_embeddings: [B, C, h, w]  SAM image-encoder output
        sparse:           [B, M, C]     sparse prompt tokens
        dense:            [B, C, h, w]  dense prompt embedding
        returns:          [B, 1, 4h, 4w] low-resolution mask logits

        Mirrors `MaskDecoder.predict_masks` with the per-prompt `repeat_interleave` removed;
        `tests/models/test_sam.py` checks it against segment-anything's decoder sample by sample.
        """
        decoder: MaskDecoder = self.mask_decoder
        b = image_embeddings.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)

        src = image_embeddings + dense
        pos_src = self.dense_positional_encoding().expand(b, -1, -1, -1)
        _, c, h, w = src.shape
        hs, src = decoder.transformer(src, pos_src, tokens)
        # Token 0 is the IoU token; token 1 the first mask token, the one multimask_output=False keeps.
        first_mask_token = hs[:, 1, :]

        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = decoder.output_hypernetworks_mlps[0](first_mask_token)  # [B, C/8]
        _, c8, uh, uw = upscaled.shape
        masks = torch.bmm(hyper_in.unsqueeze(1), upscaled.reshape(b, c8, uh * uw))
        return masks.reshape(b, 1, uh, uw)

    def dense_positional_encoding(self) -> torch.Tensor:
        """SAM's positional encoding of the image-embedding grid: [1, C, h, w].

        Equals `prompt_encoder.get_dense_pe()`, but also works when the model was cast to
        bf16/fp16 (as DeepSpeed does): segment-anything builds the grid in float32 and would
        matmul it with the half-precision buffer, so evaluate it on a float32 copy and cast back.
        """
        pe_layer = self.prompt_encoder.pe_layer
        matrix = pe_layer.positional_encoding_gaussian_matrix
        if matrix.dtype == torch.float32:
            return self.prompt_encoder.get_dense_pe()
        pe = torch.func.functional_call(
            pe_layer, {"positional_encoding_gaussian_matrix": matrix.float()}, (self.prompt_encoder.image_embedding_size,)
        )
        return pe.unsqueeze(0).to(matrix.dtype)

    def unused_decoder_parameters(self) -> list[nn.Parameter]:
        """Decoder parameters that `decode_masks` never touches: the IoU head and the hypernetwork
        MLPs of masks 1..3. They stay frozen so every trainable parameter gets a gradient."""
        decoder = self.mask_decoder
        params = list(decoder.iou_prediction_head.parameters())
        for mlp in decoder.output_hypernetworks_mlps[1:]:
            params.extend(mlp.parameters())
        return params


def build_sam(sizes: SamSizes) -> BatchedSam:
    """A randomly initialized SAM with the given sizes (segment-anything's `_build_sam`, generalized)."""
    embedding = sizes.embedding_size
    sam = BatchedSam(
        image_encoder=ImageEncoderViT(
            depth=sizes.depth,
            embed_dim=sizes.embed_dim,
            img_size=sizes.img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=sizes.num_heads,
            patch_size=sizes.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=sizes.global_attn_indexes,
            window_size=sizes.window_size,
            out_chans=sizes.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=sizes.prompt_embed_dim,
            image_embedding_size=(embedding, embedding),
            input_image_size=(sizes.img_size, sizes.img_size),
            mask_in_chans=sizes.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=sizes.decoder_depth,
                embedding_dim=sizes.prompt_embed_dim,
                mlp_dim=sizes.decoder_mlp_dim,
                num_heads=sizes.decoder_num_heads,
            ),
            transformer_dim=sizes.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=sizes.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam


def _sam_hint(config_key: str, expected_file: str) -> str:
    return (
        f"set {config_key} to a local copy of the official segment-anything checkpoint "
        f"{expected_file} (download it from {SAM_CHECKPOINTS_URL})"
    )


def require_sam_checkpoint(
    path: Optional[str | os.PathLike], *, config_key: str = "model.sam_checkpoint", expected_file: str = "sam_vit_b_01ec64.pth"
) -> Path:
    """The checkpoint path, or `ModelLoadError` if it is unset or not a file (checked before any
    large model is built, so a wrong path fails fast)."""
    return require_file(path, config_key=config_key, hint=_sam_hint(config_key, expected_file))


def load_sam_checkpoint(
    sam: Sam,
    path: Optional[str | os.PathLike],
    *,
    config_key: str = "model.sam_checkpoint",
    expected_file: str = "sam_vit_b_01ec64.pth",
) -> Sam:
    """Load an official segment-anything `.pth` state dict into `sam` (strict).

    Raises `ModelLoadError` naming `config_key`, the expected file and where to get it when the
    path is unset or missing, the file is unreadable, or its keys/shapes do not match `sam`.
    """
    path = require_sam_checkpoint(path, config_key=config_key, expected_file=expected_file)
    hint = _sam_hint(config_key, expected_file)
    state = load_tensors(path, config_key=config_key, hint=hint, what="a SAM state dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{config_key}: {path} is not a state dict of tensors; {hint}")

    problems = state_dict_problems(sam.state_dict(), state)
    if problems:
        raise ModelLoadError(
            f"{config_key}: {path} does not match this SAM layout ({'; '.join(problems)}); "
            f"is it the right model size? {hint}"
        )
    sam.load_state_dict(state, strict=True)
    return sam
