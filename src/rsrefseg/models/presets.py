"""Model presets: `tiny` (random toy backbones for CPU) and the paper's RSRefSeg-b / -l.

A preset fixes every size; the real presets load pretrained SigLIP and SAM weights from local
files named in the config (`model.siglip_path`, `model.sam_checkpoint`), never from the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rsrefseg.models.errors import ModelLoadError
from rsrefseg.models.sizes import InputSizes, Sam2Sizes, SamSizes, SiglipSizes
from rsrefseg.platform.config import ModelConfig

if TYPE_CHECKING:
    from transformers import SiglipModel

    from rsrefseg.models.sam import BatchedSam
    from rsrefseg.models.sam2 import Sam2Backbone

# The model libraries (segment-anything, transformers: seconds of imports) are imported where
# models are built, not here: the driver and the data pipeline read sizes and check files only.

__all__ = [
    "ModelLoadError", "Preset", "PrompterSizes", "TINY", "RSREFSEG_B", "RSREFSEG_L", "TINY2", "RSREFSEG2_T",
    "RSREFSEG2_S", "RSREFSEG2_B_PLUS", "RSREFSEG2_L", "get_preset", "model_preset", "input_sizes",
    "check_model_files", "build_backbones", "build_backbones2",
]  # fmt: skip


@dataclass(frozen=True)
class PrompterSizes:
    """RSRefSeg-2's cascaded prompter: attention heads, the attention's internal width and the
    MLPs' hidden width (the authors: 8 / 512 / 512)."""

    num_heads: int
    internal_dim: int
    mlp_dim: int


@dataclass(frozen=True)
class Preset:
    name: str
    sam: SamSizes | Sam2Sizes  # Sam2Sizes for arch rsrefseg2
    siglip: SiglipSizes
    label_size: int  # default mask resolution for loss and metrics
    pretrained: bool  # True: weights come from model.siglip_path / model.sam_checkpoint
    sam_checkpoint_file: str = ""  # the official file the SAM sizes match
    arch: str = "rsrefseg"
    siglip_repo: str = "google/siglip-so400m-patch14-384"  # the Hugging Face folder users download
    prompter: PrompterSizes | None = None  # RSRefSeg-2's cascaded prompter
    keep_ratio: bool = False  # letterbox inputs (RSRefSeg-2) instead of stretching them


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

# SAM 2.1 (Meta's sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml; b+ takes Hiera's defaults).
def _sam2(embed_dim, num_heads, stages, global_att_blocks, window_spec=(8, 4, 14, 7)) -> Sam2Sizes:
    return Sam2Sizes(
        img_size=1024, embed_dim=embed_dim, num_heads=num_heads, stages=stages,
        global_att_blocks=global_att_blocks, window_spec=window_spec, window_pos_embed_bkg_spatial_size=(7, 7),
        d_model=256, decoder_depth=2, decoder_mlp_dim=2048, decoder_num_heads=8, iou_head_hidden_dim=256,
    )  # fmt: skip


SAM2_HIERA_T = _sam2(96, 1, (1, 2, 7, 2), (5, 7, 9))
SAM2_HIERA_S = _sam2(96, 1, (1, 2, 11, 2), (7, 10, 13))
SAM2_HIERA_B_PLUS = _sam2(112, 2, (2, 3, 16, 3), (12, 16, 20))
SAM2_HIERA_L = _sam2(144, 2, (2, 6, 36, 4), (23, 33, 43), window_spec=(8, 4, 16, 8))
# Toy SAM 2.1: 192 px -> a 12x12 image embedding, high-res levels 48x48 and 24x24, 48x48 masks.
SAM2_TINY = Sam2Sizes(
    img_size=192, embed_dim=16, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
    window_spec=(8, 4, 4, 2), window_pos_embed_bkg_spatial_size=(4, 4),
    d_model=32, decoder_depth=2, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32,
)  # fmt: skip
# google/siglip2-so400m-patch16-512 (config.json: model_type siglip; Gemma's 256k vocabulary).
SIGLIP2_SO400M_512 = SiglipSizes(
    image_size=512, patch_size=16, hidden_size=1152, intermediate_size=4304, num_heads=16,
    vision_layers=27, text_layers=27, vocab_size=256000, max_text_len=64,
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


PROMPTER_OFFICIAL = PrompterSizes(num_heads=8, internal_dim=512, mlp_dim=512)
PROMPTER_TINY = PrompterSizes(num_heads=2, internal_dim=32, mlp_dim=64)
SIGLIP2_REPO = "google/siglip2-so400m-patch16-512"


def _rsrefseg2(name: str, sam: Sam2Sizes, checkpoint: str) -> Preset:
    """A real RSRefSeg-2 preset: SAM 2.1 at 1024 and SigLIP 2 so400m at 512, letterboxed
    inputs, the loss at the full 1024 label as the authors compute it."""
    return Preset(
        name=name, sam=sam, siglip=SIGLIP2_SO400M_512, label_size=1024, pretrained=True,
        sam_checkpoint_file=checkpoint, arch="rsrefseg2", siglip_repo=SIGLIP2_REPO, prompter=PROMPTER_OFFICIAL,
        keep_ratio=True,
    )  # fmt: skip


# RSRefSeg-2's toy SigLIP sees the letterboxed canvas at half SAM's size, as the real one (1024 ->
# 512): a plain bilinear halving is a 2 x 2 average, where a third would alias. The same 16 x 16
# grid and text tower as SIGLIP_TINY (one tokenizer for both tiny models).
SIGLIP2_TINY = SiglipSizes(
    image_size=96, patch_size=6, hidden_size=32, intermediate_size=64, num_heads=2,
    vision_layers=2, text_layers=2, vocab_size=512, max_text_len=16,
)  # fmt: skip

TINY2 = Preset(
    name="tiny", sam=SAM2_TINY, siglip=SIGLIP2_TINY, label_size=64, pretrained=False, arch="rsrefseg2",
    prompter=PROMPTER_TINY, keep_ratio=True,
)  # fmt: skip
RSREFSEG2_T = _rsrefseg2("rsrefseg2-t", SAM2_HIERA_T, "sam2.1_hiera_tiny.pt")
RSREFSEG2_S = _rsrefseg2("rsrefseg2-s", SAM2_HIERA_S, "sam2.1_hiera_small.pt")
RSREFSEG2_B_PLUS = _rsrefseg2("rsrefseg2-b+", SAM2_HIERA_B_PLUS, "sam2.1_hiera_base_plus.pt")
RSREFSEG2_L = _rsrefseg2("rsrefseg2-l", SAM2_HIERA_L, "sam2.1_hiera_large.pt")
PRESETS = {
    "rsrefseg": (TINY, RSREFSEG_B, RSREFSEG_L),
    "rsrefseg2": (TINY2, RSREFSEG2_T, RSREFSEG2_S, RSREFSEG2_B_PLUS, RSREFSEG2_L),
}


def get_preset(name: str, arch: str = "") -> Preset:
    """The preset of that name; `tiny` exists for both architectures, so `arch` picks (default
    rsrefseg); a real preset's name says its architecture."""
    candidates = PRESETS.get(arch, ()) if arch else (*PRESETS["rsrefseg"], *PRESETS["rsrefseg2"])
    for preset in candidates:
        if preset.name == name:
            return preset
    known = ", ".join(p.name for p in candidates)
    raise ValueError(f"unknown model preset {name!r}{f' for model.arch={arch}' if arch else ''}; known: {known}")


def model_preset(model_cfg: ModelConfig) -> Preset:
    """The preset a model config builds: its name within its architecture."""
    return get_preset(model_cfg.preset, model_cfg.arch)


def input_sizes(model_cfg: ModelConfig, label_size_override: int = 0) -> InputSizes:
    """What the data pipeline must produce for this model (label size: override, else the preset's)."""
    preset = model_preset(model_cfg)
    return InputSizes(
        sam_image=preset.sam.img_size,
        siglip_image=preset.siglip.image_size,
        label=label_size_override or preset.label_size,
        max_text_len=preset.siglip.max_text_len,
        keep_ratio=preset.keep_ratio,
    )


def check_model_files(model_cfg: ModelConfig) -> None:
    """Fail fast (before any Ray resource or large model) when a real preset's weight files are
    unset or missing: raises `ModelLoadError` naming the config key and what to download.
    The `tiny` preset needs no files."""
    preset = model_preset(model_cfg)
    if not preset.pretrained:
        return
    from rsrefseg.models.siglip import require_siglip_dir

    if preset.arch == "rsrefseg2":
        from rsrefseg.models.sam2 import require_sam2_checkpoint as require_checkpoint
    else:
        from rsrefseg.models.sam import require_sam_checkpoint as require_checkpoint
    require_checkpoint(model_cfg.sam_checkpoint, config_key="model.sam_checkpoint",
                       expected_file=preset.sam_checkpoint_file)
    require_siglip_dir(model_cfg.siglip_path, config_key="model.siglip_path", repo=preset.siglip_repo)


def build_backbones(model_cfg: ModelConfig, *, random_init: bool = False) -> tuple[SiglipModel, BatchedSam]:
    """SigLIP and SAM of the preset: random for `tiny` (seed the torch RNG around the call),
    loaded from `model.siglip_path` / `model.sam_checkpoint` for the real presets.
    `random_init` builds any preset at its real sizes without weights (speed benchmarks)."""
    from rsrefseg.models.sam import build_sam, load_sam_checkpoint
    from rsrefseg.models.siglip import build_random_siglip, load_siglip

    preset = model_preset(model_cfg)
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


def build_backbones2(model_cfg: ModelConfig, *, random_init: bool = False) -> tuple[SiglipModel, Sam2Backbone]:
    """RSRefSeg-2's SigLIP 2 and SAM 2.1 (image encoder, prompt encoder, mask decoder,
    `no_mem_embed`): random for `tiny` or `random_init`, else loaded from the official files."""
    from rsrefseg.models.sam2 import build_sam2_backbone, load_sam2_checkpoint
    from rsrefseg.models.siglip import build_random_siglip, load_siglip

    preset = model_preset(model_cfg)
    dynamic = model_cfg.rsrefseg2.dynamic_multimask
    if not preset.pretrained or random_init:
        return (build_random_siglip(preset.siglip, repo=preset.siglip_repo),
                build_sam2_backbone(preset.sam, dynamic_multimask=dynamic))
    check_model_files(model_cfg)
    sam = build_sam2_backbone(preset.sam, dynamic_multimask=dynamic)
    load_sam2_checkpoint(
        sam, model_cfg.sam_checkpoint, config_key="model.sam_checkpoint", expected_file=preset.sam_checkpoint_file
    )
    siglip = load_siglip(model_cfg.siglip_path, preset.siglip, config_key="model.siglip_path", repo=preset.siglip_repo)
    return siglip, sam
