"""LoRA (W* = W + (alpha/r) B A) on the three backbones, with peft's own layers.

Targets are given as one anchored regular expression per backbone (peft `fullmatch`es a string
`target_modules` against each module's dotted name), with the adapted layer indices spelled out,
so what gets adapted is readable from the pattern and `patch_embed.proj` can never match:

- SAM image encoder: `blocks.{i}.attn.qkv|attn.proj|mlp.lin1|mlp.lin2`, plus the neck convs
  `neck.0`, `neck.2` (they sit after the last block, so "half" keeps them);
- SigLIP vision and text towers: `encoder.layers.{i}.self_attn.q_proj|k_proj|v_proj|out_proj`
  (anchored at `encoder.`, so the vision pooling head's own `attention.out_proj` is left alone).

Layer choice: "full" = every block, "half" = the later half, "zero" = no LoRA on that
backbone. For an odd depth, "half" is the last ceil(depth/2) blocks (paper variant: 14 of
SigLIP's 27) or the last floor(depth/2) (`lora.half_depth=floor`, the authors' code: 13 of 27).
With `lora.text_head`, the SigLIP text tower's `head` (the projection that gives t_global) is
adapted too, as in the authors' code.

`cfg` must be resolved (`LoraConfig` of `ModelConfig.resolved()`): its variant keys are set.
"""

from __future__ import annotations

from typing import Optional

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from torch import nn

from rsrefseg.platform.config import LoraConfig

SAM_BLOCK_TARGETS = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")
SAM_NECK_TARGETS = ("neck.0", "neck.2")
SIGLIP_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def layer_indices(num_layers: int, choice: str, half_depth: str = "ceil") -> list[int]:
    """Indices of the layers that get LoRA: all, the later half (ceil or floor of depth/2
    layers), or none."""
    if choice == "full":
        return list(range(num_layers))
    if choice == "half":
        count = num_layers - num_layers // 2 if half_depth == "ceil" else num_layers // 2
        return list(range(num_layers - count, num_layers))
    if choice == "zero":
        return []
    raise ValueError(f"layer choice must be full, half or zero, got {choice!r}")


def _alternatives(items: list) -> str:
    return "(" + "|".join(str(i).replace(".", r"\.") for i in items) + ")"


def sam_target_regex(depth: int, choice: str, half_depth: str = "ceil") -> Optional[str]:
    """Regex over SAM image-encoder module names, or None for no LoRA."""
    layers = layer_indices(depth, choice, half_depth)
    if not layers:
        return None
    blocks = rf"blocks\.{_alternatives(layers)}\.{_alternatives(list(SAM_BLOCK_TARGETS))}"
    return rf"{blocks}|{_alternatives(list(SAM_NECK_TARGETS))}"


def siglip_target_regex(num_layers: int, choice: str, half_depth: str = "ceil", *, head: bool = False) -> Optional[str]:
    """Regex over a SigLIP tower's module names (vision_model or text_model), or None.
    `head`: the tower's `head` projection too (the text tower's t_global projection)."""
    layers = layer_indices(num_layers, choice, half_depth)
    if not layers:
        return None
    regex = rf"encoder\.layers\.{_alternatives(layers)}\.self_attn\.{_alternatives(list(SIGLIP_ATTENTION_TARGETS))}"
    return rf"{regex}|head" if head else regex


def inject_lora(module: nn.Module, *, target_regex: Optional[str], rank: int, cfg: LoraConfig) -> nn.Module:
    """Wrap the matching layers of `module` in peft LoRA layers (in place).

    peft also marks every non-LoRA parameter of `module` as frozen.
    """
    if target_regex is None:
        return module
    peft_cfg = PeftLoraConfig(
        r=rank,
        lora_alpha=cfg.alpha_for(rank),
        lora_dropout=cfg.dropout,
        target_modules=target_regex,
        bias="none",
    )
    return inject_adapter_in_model(peft_cfg, module)


def apply_lora(*, sam_image_encoder: nn.Module, siglip_vision: nn.Module, siglip_text: nn.Module, cfg: LoraConfig) -> None:
    """Put LoRA on the three backbones as `cfg` says (ranks and layer choice per backbone)."""
    inject_lora(
        sam_image_encoder,
        target_regex=sam_target_regex(len(sam_image_encoder.blocks), cfg.sam_layers, cfg.half_depth),
        rank=cfg.sam_rank,
        cfg=cfg,
    )
    _lora_siglip(siglip_vision, siglip_text, cfg)


def lora_parameter_count(module: nn.Module) -> int:
    """Number of LoRA parameters (lora_A / lora_B) inside `module`."""
    return sum(p.numel() for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name)


# RSRefSeg-2 (the authors' regexes, configs_RSRefSeg2/*): SAM 2.1's Hiera attention and the
# neck's 1x1 convs; SigLIP's self-attention as above. The authors' vision regex also matches the
# vision pooling head (`head.attention.out_proj`, `head.mlp.fc1/fc2`), but RSRefSeg-2 never uses
# the pooled image embedding, and `head.attention` is an nn.MultiheadAttention, whose forward
# reads `out_proj.weight` directly and so bypasses a LoRA wrapper on it: those adapters would
# never change an output nor get a gradient. They are left out.
SAM2_BLOCK_TARGETS = ("attn.qkv", "attn.proj")


def sam2_target_regex(depth: int, choice: str, half_depth: str = "ceil") -> Optional[str]:
    """Regex over SAM 2.1 image-encoder module names (trunk blocks and neck convs), or None."""
    layers = layer_indices(depth, choice, half_depth)
    if not layers:
        return None
    return rf"trunk\.blocks\.{_alternatives(layers)}\.{_alternatives(list(SAM2_BLOCK_TARGETS))}|neck\.convs\.\d+\.conv"


def apply_lora_rsrefseg2(*, sam2_image_encoder: nn.Module, siglip_vision: nn.Module, siglip_text: nn.Module,
                         cfg: LoraConfig) -> None:
    """LoRA on RSRefSeg-2's backbones as `cfg` says (SAM's rank and layer choice for SAM 2.1)."""
    inject_lora(
        sam2_image_encoder,
        target_regex=sam2_target_regex(len(sam2_image_encoder.trunk.blocks), cfg.sam_layers, cfg.half_depth),
        rank=cfg.sam_rank,
        cfg=cfg,
    )
    _lora_siglip(siglip_vision, siglip_text, cfg)


def _lora_siglip(siglip_vision: nn.Module, siglip_text: nn.Module, cfg: LoraConfig) -> None:
    inject_lora(
        siglip_vision,
        target_regex=siglip_target_regex(len(siglip_vision.encoder.layers), cfg.siglip_vision_layers, cfg.half_depth),
        rank=cfg.siglip_vision_rank,
        cfg=cfg,
    )
    inject_lora(
        siglip_text,
        target_regex=siglip_target_regex(
            len(siglip_text.encoder.layers), cfg.siglip_text_layers, cfg.half_depth, head=cfg.text_head
        ),
        rank=cfg.siglip_text_rank,
        cfg=cfg,
    )
