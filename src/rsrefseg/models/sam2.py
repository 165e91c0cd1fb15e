"""SAM 2.1 backbone of RSRefSeg-2, built from Meta's `sam2` classes with every size a parameter.

RSRefSeg-2 uses SAM 2.1 as an image segmenter only: the Hiera image encoder with its FPN neck,
SAM's prompt encoder (for its dense mask prompt and positional encoding) and the mask decoder
that also reads the two high-resolution FPN levels. The video parts of Meta's `SAM2Base`
(memory attention, memory encoder, object pointers) are never run, so `Sam2Backbone` holds only
the submodules that are, under Meta's attribute names: its state-dict keys are exactly the
official checkpoint's keys under `image_encoder.`, `sam_prompt_encoder.`, `sam_mask_decoder.`
plus `no_mem_embed`, and `load_sam2_checkpoint` copies those tensors unchanged (strict on that
subset) and ignores the rest of the file.

`encode` reproduces `SAM2Base.forward_image` + `_prepare_backbone_features` + the
`directly_add_no_mem_embed` step of `SAM2ImagePredictor.set_image`; `decode` calls Meta's mask
decoder the way `SAM2Base._forward_sam_heads` does (one prompt set per image, batched,
single-mask output). `tests/models/test_sam2.py` checks both against Meta's own model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from torch import nn
from torch.nn.init import trunc_normal_

from rsrefseg.models.errors import ModelLoadError, state_dict_problems
from rsrefseg.models.sizes import Sam2Sizes
from rsrefseg.models.weight_files import load_tensors, require_file

# SAM 2 normalizes 0..1 RGB with ImageNet statistics (sam2.utils.transforms.SAM2Transforms).
SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)

SAM2_CHECKPOINTS_URL = "https://github.com/facebookresearch/sam2#download-checkpoints"

# What of an official SAM2Base state dict the backbone holds (the rest is the video model).
SAM2_BACKBONE_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.")
SAM2_NO_MEM_EMBED_KEY = "no_mem_embed"

# SAM2Base's stride of the image embedding (backbone_stride) and the FPN levels it feeds the
# mask decoder: stride 4 and 8 (high-res) and 16 (image embedding); scalp=1 drops stride 32.
SAM2_BACKBONE_STRIDE = 16


class Sam2Backbone(nn.Module):
    """The SAM 2.1 submodules RSRefSeg-2 runs, with Meta's names (so Meta's checkpoint keys).

    image_encoder:      Hiera trunk + FPN neck (`ImageEncoder`, scalp=1)
    sam_prompt_encoder: SAM's prompt encoder (dense mask prompt, positional encoding)
    sam_mask_decoder:   the two-way-transformer mask decoder with high-res features
    no_mem_embed:       [1, 1, d_model], added to the image embedding of a frame without memory
    """

    def __init__(self, sizes: Sam2Sizes, *, dynamic_multimask: bool = False) -> None:
        super().__init__()
        check_sam2_sizes(sizes)
        self.image_encoder = _image_encoder(sizes)
        self.sam_prompt_encoder = _prompt_encoder(sizes)
        self.sam_mask_decoder = _mask_decoder(sizes, dynamic_multimask=dynamic_multimask)
        # SAM2Base: zeros, then trunc_normal_(std=0.02).
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, sizes.d_model))
        trunc_normal_(self.no_mem_embed, std=0.02)
        # Not persistent: the official file has no such keys, and strict loading must stay exact.
        self.register_buffer("pixel_mean", torch.tensor(SAM2_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM2_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the module was cast to (float32, or bf16/fp16 after `.to(dtype)`)."""
        return self.image_encoder.trunk.patch_embed.proj.weight.dtype

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [B,3,S,S] -> ImageNet-normalized float [B,3,S,S] in the trunk's dtype.

        Computed in float32 (the buffers too may have been cast) and rounded once at the end.
        Inputs are already resized to the square `img_size`."""
        x = (image.float() / 255.0 - self.pixel_mean.float()) / self.pixel_std.float()
        return x.to(self.weight_dtype)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalized pixels [B,3,S,S] -> (image_embed [B,d,S/16,S/16],
        high_res [[B,d/8,S/4,S/4], [B,d/4,S/8,S/8]]).

        SAM2Base.forward_image (the decoder's conv_s0/conv_s1 on FPN levels 0/1), then
        `no_mem_embed` added to the lowest-resolution level as SAM2ImagePredictor does with
        `directly_add_no_mem_embed`. Meta flattens to (hw, b, c) and back around that add; on the
        map it is the same per-channel add, so the round trip is skipped.
        """
        dtype = self.weight_dtype
        fpn = self.image_encoder(pixels)["backbone_fpn"]  # strides 4, 8, 16
        decoder = self.sam_mask_decoder
        high_res = [decoder.conv_s0(fpn[0]).to(dtype), decoder.conv_s1(fpn[1]).to(dtype)]
        # The neck upsamples the top-down path in float32, so level 2 comes out float32 even in a
        # bf16 module; add in that precision, round once, so the decoder gets its own dtype.
        image_embed = fpn[2] + self.no_mem_embed.reshape(1, -1, 1, 1)
        return image_embed.to(dtype), high_res

    def decode(
        self,
        image_embed: torch.Tensor,
        high_res: list[torch.Tensor],
        sparse: torch.Tensor,
        dense_mask_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One prompt set per image, batched -> low-res mask logits [B, 1, 4h, 4w].

        image_embed:       [B, d, h, w]    from `encode`
        high_res:          [[B, d/8, 4h, 4w], [B, d/4, 2h, 2w]]  from `encode`
        sparse:            [B, M, d]       sparse prompt tokens
        dense_mask_logits: [B, 1, 4h, 4w]  mask prompt (logits), or None for SAM's no-mask embedding

        As SAM2Base._forward_sam_heads calls the decoder: multimask_output=False and
        repeat_image=False (the image batch and the prompt batch are the same batch).
        """
        dtype = self.weight_dtype
        dense = self._dense_prompt(dense_mask_logits, image_embed)
        masks, _iou, _tokens, _object_score = self.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.dense_positional_encoding(),
            # Inputs from float32 callers meet bf16 weights only here; cat/matmul would not promote.
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=False,
            high_res_features=high_res,
        )
        return masks

    def _dense_prompt(self, dense_mask_logits: Optional[torch.Tensor], image_embed: torch.Tensor) -> torch.Tensor:
        """The prompt encoder's dense embedding [B, d, h, w] of a mask prompt, or its learned
        no-mask embedding expanded to the batch (what PromptEncoder.forward gives for masks=None,
        but for B images instead of its batch of 1 without any prompt)."""
        encoder = self.sam_prompt_encoder
        if dense_mask_logits is None:
            b, _, h, w = image_embed.shape
            return encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        _sparse, dense = encoder(points=None, boxes=None, masks=dense_mask_logits.to(self.weight_dtype))
        return dense

    def dense_positional_encoding(self) -> torch.Tensor:
        """SAM's positional encoding of the image-embedding grid: [1, d, h, w].

        Equals `sam_prompt_encoder.get_dense_pe()`, but also works after the module was cast to
        bf16/fp16: sam2's PositionEmbeddingRandom (like segment-anything's) builds the grid in
        float32 and matmuls it with the cast Gaussian buffer, which fails; evaluate it with a
        float32 copy of the buffer and cast the result back.
        """
        pe_layer = self.sam_prompt_encoder.pe_layer
        matrix = pe_layer.positional_encoding_gaussian_matrix
        if matrix.dtype == torch.float32:
            return self.sam_prompt_encoder.get_dense_pe()
        pe = torch.func.functional_call(
            pe_layer,
            {"positional_encoding_gaussian_matrix": matrix.float()},
            (self.sam_prompt_encoder.image_embedding_size,),
        )
        return pe.unsqueeze(0).to(matrix.dtype)

    def unused_decoder_parameters(self) -> list[nn.Parameter]:
        """Mask-decoder parameters single-mask decoding never gets a gradient through.

        The IoU head and the object-score head (their outputs are dropped) and the hypernetwork
        MLPs of masks 1..3 (their masks are sliced away: zero gradient). The IoU, object-score and
        multimask *tokens* do get gradients: they take part in the transformer's attention.
        With `dynamic_multimask` the IoU head and masks 1..3 can pick the output in eval mode,
        but never in training mode (MaskDecoder skips it then), so freezing them is still right.
        """
        decoder = self.sam_mask_decoder
        params = list(decoder.iou_prediction_head.parameters())
        params.extend(decoder.pred_obj_score_head.parameters())
        for mlp in decoder.output_hypernetworks_mlps[1:]:
            params.extend(mlp.parameters())
        return params


def build_sam2_backbone(sizes: Sam2Sizes, *, dynamic_multimask: bool = False) -> Sam2Backbone:
    """A randomly initialized SAM 2.1 backbone with the given sizes (seed the torch RNG around
    the call). `dynamic_multimask`: Meta's `apply_postprocessing` fallback to the best multimask
    output when the single mask is unstable (eval mode only)."""
    return Sam2Backbone(sizes, dynamic_multimask=dynamic_multimask)


def check_sam2_sizes(sizes: Sam2Sizes) -> None:
    """`ValueError` for sizes Meta's Hiera accepts at build time but fails on at the first forward
    (a ZeroDivisionError or a shape mismatch deep inside sam2)."""
    # Hiera pools queries in the first block of every stage after the first and shrinks that
    # block's window by the pooling stride; a global block (window 0) there divides by zero.
    q_pool_blocks = [sum(sizes.stages[:i]) for i in range(1, len(sizes.stages))]
    clash = sorted(set(q_pool_blocks) & set(sizes.global_att_blocks))
    if clash:
        raise ValueError(
            f"Sam2Sizes.global_att_blocks {tuple(sizes.global_att_blocks)} includes block(s) {clash}, "
            f"the first block of a stage (query pooling: blocks {q_pool_blocks}); Meta's Hiera needs a "
            f"window there. Use other blocks, e.g. later blocks of the third stage as the official sizes do."
        )
    # Patch stride 4 and three 2x poolings, halved exactly so the FPN's 2x upsampling fits back;
    # the first-stage map must tile into windows of window_spec[0] (the windowed pos. embedding).
    side = sizes.img_size // 4
    if sizes.img_size % 32 or side % sizes.window_spec[0]:
        raise ValueError(
            f"Sam2Sizes.img_size {sizes.img_size} must be a multiple of 32 with img_size/4 a multiple "
            f"of window_spec[0]={sizes.window_spec[0]}"
        )


def _image_encoder(sizes: Sam2Sizes) -> ImageEncoder:
    """Hiera + FPN neck as configs/sam2.1/sam2.1_hiera_*.yaml instantiate them."""
    trunk = Hiera(
        embed_dim=sizes.embed_dim,
        num_heads=sizes.num_heads,
        stages=tuple(sizes.stages),
        global_att_blocks=tuple(sizes.global_att_blocks),
        window_pos_embed_bkg_spatial_size=tuple(sizes.window_pos_embed_bkg_spatial_size),
        window_spec=tuple(sizes.window_spec),
    )
    neck = FpnNeck(
        # warmup_cache=False: the default would compute this parameter-free cache on the current
        # CUDA device at construction, creating a CUDA context before the caller picked a device.
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=sizes.d_model, normalize=True, scale=None, temperature=10000, warmup_cache=False
        ),
        d_model=sizes.d_model,
        # A list: ImageEncoder asserts it equals the trunk's channel_list (a list).
        backbone_channel_list=list(sizes.backbone_channel_list),
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    return ImageEncoder(trunk=trunk, neck=neck, scalp=1)


def _prompt_encoder(sizes: Sam2Sizes) -> PromptEncoder:
    """SAM2Base._build_sam_heads' prompt encoder."""
    embedding = sizes.img_size // SAM2_BACKBONE_STRIDE
    return PromptEncoder(
        embed_dim=sizes.d_model,
        image_embedding_size=(embedding, embedding),
        input_image_size=(sizes.img_size, sizes.img_size),
        mask_in_chans=sizes.mask_in_chans,
    )


def _mask_decoder(sizes: Sam2Sizes, *, dynamic_multimask: bool) -> MaskDecoder:
    """SAM2Base._build_sam_heads' mask decoder with the SAM 2.1 configs' flags; the stability
    delta/threshold are those build_sam2(apply_postprocessing=True) sets."""
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=sizes.decoder_depth,
            embedding_dim=sizes.d_model,
            mlp_dim=sizes.decoder_mlp_dim,
            num_heads=sizes.decoder_num_heads,
        ),
        transformer_dim=sizes.d_model,
        iou_head_depth=3,
        iou_head_hidden_dim=sizes.iou_head_hidden_dim,
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
        dynamic_multimask_via_stability=dynamic_multimask,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
    )


# -- Official checkpoints ----------------------------------------------------------------------


def _sam2_hint(config_key: str, expected_file: str) -> str:
    return (
        f"set {config_key} to a local copy of the official SAM 2.1 checkpoint "
        f"{expected_file} (download it from {SAM2_CHECKPOINTS_URL})"
    )


def require_sam2_checkpoint(
    path: Optional[str | os.PathLike],
    *,
    config_key: str = "model.sam_checkpoint",
    expected_file: str = "sam2.1_hiera_large.pt",
) -> Path:
    """The checkpoint path, or `ModelLoadError` if it is unset or not a file (checked before any
    large model is built, so a wrong path fails fast)."""
    return require_file(path, config_key=config_key, hint=_sam2_hint(config_key, expected_file))


def _read_model_state(path: Path, *, config_key: str, hint: str) -> dict[str, torch.Tensor]:
    """The `"model"` state dict of an official SAM 2 file (`torch.save({"model": sd})`)."""
    payload = load_tensors(path, config_key=config_key, hint=hint, what="a SAM 2 checkpoint")
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise ModelLoadError(
            f"{config_key}: {path} is not a SAM 2 checkpoint (no \"model\" state dict in it, as the "
            f"official files have); {hint}"
        )
    state = payload["model"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{config_key}: {path}: its \"model\" entry is not a state dict of tensors; {hint}")
    return state


def backbone_subset(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a whole-SAM2Base state dict that `Sam2Backbone` holds."""
    return {k: v for k, v in state.items() if k.startswith(SAM2_BACKBONE_PREFIXES) or k == SAM2_NO_MEM_EMBED_KEY}


def load_sam2_checkpoint(
    backbone: Sam2Backbone,
    path: Optional[str | os.PathLike],
    *,
    config_key: str = "model.sam_checkpoint",
    expected_file: str = "sam2.1_hiera_large.pt",
) -> Sam2Backbone:
    """Load the backbone's tensors from an official SAM 2.1 `.pt` file, unchanged (strict on the
    backbone's keys; the file's video-model tensors are ignored).

    Raises `ModelLoadError` naming `config_key`, the file, the expected file and where to get it
    when the path is unset or missing, the file is unreadable or holds code, has no "model"
    state dict, or its keys/shapes under the backbone's prefixes do not match `backbone`.
    """
    path = require_sam2_checkpoint(path, config_key=config_key, expected_file=expected_file)
    hint = _sam2_hint(config_key, expected_file)
    state = backbone_subset(_read_model_state(path, config_key=config_key, hint=hint))
    problems = state_dict_problems(backbone.state_dict(), state)
    if problems:
        raise ModelLoadError(
            f"{config_key}: {path} does not match this SAM 2.1 layout ({'; '.join(problems)}); "
            f"is it the right model size? {hint}"
        )
    backbone.load_state_dict(state, strict=True)
    return backbone
