"""Model presets: `tiny` (random toy backbones for CPU) and the paper's RSRefSeg-b / -l.

A preset fixes every size; the real presets load pretrained SigLIP and SAM weights from local
files named in the config (`model.siglip_path`, `model.sam_checkpoint`), never from the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rsrefseg.models.errors import ModelLoadError
from rsrefseg.models.sizes import InputSizes, SamSizes, SiglipSizes
from rsrefseg.platform.config import ModelConfig

if TYPE_CHECKING:
    from transformers import SiglipModel

    from rsrefseg.models.sam import BatchedSam

# The model libraries (segment-anything, transformers: seconds of imports) are imported where
# models are built, not here: the driver and the data pipeline read sizes and check files only.

__all__ = [
    "ModelLoadError", "Preset", "TINY", "RSREFSEG_B", "RSREFSEG_L",
    "get_preset", "input_sizes", "check_model_files", "build_backbones",
]  # fmt: skip


@dataclass(frozen=True)
class Preset:
    name: str
    sam: SamSizes
    siglip: SiglipSizes
    label_size: int  # default mask resolution for loss and metrics
    pretrained: bool  # True: weights come from model.siglip_path / model.sam_checkpoint
    sam_checkpoint_file: str = ""  # the official file the SAM sizes match


# The official segment-anything layouts (segment_anything/build_sam.py).
SAM_VIT_B = SamSizes(
    img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12,
    global_attn_indexes=(2, 5, 8, 11), window_size=14, prompt_embed_dim=256, mask_in_chans=16,
    decoder_depth=2, decoder_mlp_dim=2048, decoder_num_heads=8, iou_head_hidden_dim=256,
)  # fmt: skip
SAM_VIT_L = SamSizes(
    img_size=1024, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
    global_attn_indexes=(5, 11, 17, 23), window_size=14, prompt_embed_dim=256, mask_in_chans=16,
    decoder_depth=2, decoder_mlp_dim=2048, decoder_num_heads=8, iou_head_hidden_dim=256,
)  # fmt: skip
# google/siglip-so400m-patch14-384.
SIGLIP_SO400M_384 = SiglipSizes(
    image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_heads=16,
    vision_layers=27, text_layers=27, vocab_size=32000, max_text_len=64,
)  # fmt: skip

# Toy sizes: a 16x16 SAM embedding (64x64 low-res masks) and a 16x16 SigLIP grid, so the
# prompter's rates 2/4/8 give 64/16/4 sparse tokens and BatchNorm never sees a 1x1 map.
SAM_TINY = SamSizes(
    img_size=64, patch_size=4, embed_dim=32, depth=2, num_heads=2,
    global_attn_indexes=(1,), window_size=8, prompt_embed_dim=32, mask_in_chans=16,
    decoder_depth=2, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32,
)  # fmt: skip
SIGLIP_TINY = SiglipSizes(
    image_size=64, patch_size=4, hidden_size=32, intermediate_size=64, num_heads=2,
    vision_layers=2, text_layers=2, vocab_size=512, max_text_len=16,
)  # fmt: skip

TINY = Preset(name="tiny", sam=SAM_TINY, siglip=SIGLIP_TINY, label_size=64, pretrained=False)
RSREFSEG_B = Preset(
    name="rsrefseg-b", sam=SAM_VIT_B, siglip=SIGLIP_SO400M_384, label_size=512, pretrained=True,
    sam_checkpoint_file="sam_vit_b_01ec64.pth",
)  # fmt: skip
RSREFSEG_L = Preset(
    name="rsrefseg-l", sam=SAM_VIT_L, siglip=SIGLIP_SO400M_384, label_size=512, pretrained=True,
    sam_checkpoint_file="sam_vit_l_0b3195.pth",
)  # fmt: skip


def get_preset(name: str) -> Preset:
    for preset in (TINY, RSREFSEG_B, RSREFSEG_L):
        if preset.name == name:
            return preset
    raise ValueError(f"unknown model preset {name!r}; known: tiny, rsrefseg-b, rsrefseg-l")


def input_sizes(model_cfg: ModelConfig, label_size_override: int = 0) -> InputSizes:
    """What the data pipeline must produce for this model (label size: override, else the preset's)."""
    preset = get_preset(model_cfg.preset)
    return InputSizes(
        sam_image=preset.sam.img_size,
        siglip_image=preset.siglip.image_size,
        label=label_size_override or preset.label_size,
        max_text_len=preset.siglip.max_text_len,
    )


def check_model_files(model_cfg: ModelConfig) -> None:
    """Fail fast (before any Ray resource or large model) when a real preset's weight files are
    unset or missing: raises `ModelLoadError` naming the config key and what to download.
    The `tiny` preset needs no files."""
    preset = get_preset(model_cfg.preset)
    if not preset.pretrained:
        return
    from rsrefseg.models.sam import require_sam_checkpoint
    from rsrefseg.models.siglip import require_siglip_dir

    require_sam_checkpoint(
        model_cfg.sam_checkpoint, config_key="model.sam_checkpoint", expected_file=preset.sam_checkpoint_file
    )
    require_siglip_dir(model_cfg.siglip_path, config_key="model.siglip_path")


def build_backbones(model_cfg: ModelConfig, *, random_init: bool = False) -> tuple[SiglipModel, BatchedSam]:
    """SigLIP and SAM of the preset: random for `tiny` (seed the torch RNG around the call),
    loaded from `model.siglip_path` / `model.sam_checkpoint` for the real presets.
    `random_init` builds any preset at its real sizes without weights (speed benchmarks)."""
    from rsrefseg.models.sam import build_sam, load_sam_checkpoint
    from rsrefseg.models.siglip import build_random_siglip, load_siglip

    preset = get_preset(model_cfg.preset)
    if not preset.pretrained or random_init:
        return build_random_siglip(preset.siglip), build_sam(preset.sam)
    # Check both paths before building anything large, so a typo fails in milliseconds.
    check_model_files(model_cfg)
    sam = build_sam(preset.sam)
    load_sam_checkpoint(
        sam, model_cfg.sam_checkpoint, config_key="model.sam_checkpoint", expected_file=preset.sam_checkpoint_file
    )
    siglip = load_siglip(model_cfg.siglip_path, preset.siglip, config_key="model.siglip_path")
    return siglip, sam
