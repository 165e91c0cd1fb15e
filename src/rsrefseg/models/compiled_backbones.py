"""`torch.compile` of the backbones (SAM's image encoder, SigLIP's vision and text towers).

The backbones are most of a step's FLOPs and, at RSRefSeg sizes, a long chain of small
elementwise kernels around each matmul (LayerNorm, GELU, LoRA's extra matmuls and adds, the
relative-position bias). Inductor fuses those chains. Each backbone is compiled in place with
`nn.Module.compile()`, so parameter names, LoRA adapters and checkpoints are unchanged; the first
step (and the first evaluation batch) pays the compile, which is why this is off by default: it
pays back only on long GPU runs (measure with `benchmarks/train_step.py --variant
model.compile_backbones=true`). On CPU, Inductor needs a C++ compiler (gcc), as DeepSpeed does.
"""

from __future__ import annotations

from torch import nn


def compile_backbones(sam_image_encoder: nn.Module, siglip_model: nn.Module) -> int:
    """Compile the three backbone towers in place; returns how many were compiled."""
    towers = (sam_image_encoder, siglip_model.vision_model, siglip_model.text_model)
    for tower in towers:
        # dynamic=None: a changed batch size (the last, smaller batch) recompiles once with
        # symbolic shapes instead of once per size.
        tower.compile(dynamic=None)
    return len(towers)
