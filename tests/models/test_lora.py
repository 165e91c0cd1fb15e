"""LoRA placement: which layers are adapted, and how the trainable count follows the config."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from rsrefseg.models.lora import layer_indices, lora_parameter_count, sam_target_regex, siglip_target_regex
from rsrefseg.models.presets import TINY
from rsrefseg.models.build import build_model
from tests.models.helpers import tiny_model_config


def _linear_lora(rank: int, d_in: int, d_out: int) -> int:
    return rank * (d_in + d_out)  # A: r x in, B: out x r


def expected_lora_counts(sam_rank, sam_layers, vis_rank, vis_layers, txt_rank, txt_layers):
    """Hand count for the tiny sizes: LoRA params of (SAM encoder, SigLIP vision, SigLIP text)."""
    e = TINY.sam.embed_dim
    n = TINY.sam.prompt_embed_dim
    per_block = (
        _linear_lora(sam_rank, e, 3 * e)  # attn.qkv
        + _linear_lora(sam_rank, e, e)  # attn.proj
        + _linear_lora(sam_rank, e, 4 * e)  # mlp.lin1
        + _linear_lora(sam_rank, 4 * e, e)  # mlp.lin2
    )
    neck = sam_rank * (e + n) + sam_rank * (9 * n + n)  # neck.0 (1x1 conv), neck.2 (3x3 conv)
    sam_blocks = len(layer_indices(TINY.sam.depth, sam_layers))
    sam = sam_blocks * per_block + (neck if sam_blocks else 0)
    h = TINY.siglip.hidden_size
    per_layer = lambda r: 4 * _linear_lora(r, h, h)  # q, k, v, out
    vis = len(layer_indices(TINY.siglip.vision_layers, vis_layers)) * per_layer(vis_rank)
    txt = len(layer_indices(TINY.siglip.text_layers, txt_layers)) * per_layer(txt_rank)
    return sam, vis, txt


CASES = [
    # (sam_rank, sam_layers, vision_rank, vision_layers, text_rank, text_layers)
    (16, "full", 16, "full", 16, "full"),
    (8, "full", 16, "full", 16, "full"),
    (32, "full", 16, "full", 16, "full"),
    (16, "full", 16, "full", 16, "half"),
    (16, "full", 16, "full", 16, "zero"),
    (16, "half", 4, "half", 16, "full"),
    (16, "zero", 16, "zero", 16, "zero"),
]


def _build(case):
    sr, sl, vr, vl, tr, tl = case
    return build_model(
        tiny_model_config(
            [
                f"model.lora.sam_rank={sr}",
                f"model.lora.sam_layers={sl}",
                f"model.lora.siglip_vision_rank={vr}",
                f"model.lora.siglip_vision_layers={vl}",
                f"model.lora.siglip_text_rank={tr}",
                f"model.lora.siglip_text_layers={tl}",
            ]
        )
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_lora_parameter_counts(case):
    model = _build(case)
    sam, vis, txt = expected_lora_counts(*case)
    assert lora_parameter_count(model.sam.image_encoder) == sam
    assert lora_parameter_count(model.siglip.model.vision_model) == vis
    assert lora_parameter_count(model.siglip.model.text_model) == txt
    # Everything trainable beyond LoRA is the same for every LoRA setting.
    no_lora = _build((16, "zero", 16, "zero", 16, "zero"))
    assert model.parameter_counts()[0] - no_lora.parameter_counts()[0] == sam + vis + txt


def test_lora_relations():
    counts = {c: _build(c).parameter_counts()[0] for c in CASES}
    full = counts[CASES[0]]
    assert counts[(16, "full", 16, "full", 16, "half")] < full
    assert counts[(16, "full", 16, "full", 16, "zero")] < counts[(16, "full", 16, "full", 16, "half")]
    # Rank 32 vs 16 doubles SAM's LoRA parameters.
    r16 = lora_parameter_count(_build(CASES[0]).sam)
    r32 = lora_parameter_count(_build(CASES[2]).sam)
    assert r32 == 2 * r16
    assert lora_parameter_count(_build((16, "full", 16, "full", 16, "zero")).siglip.model.text_model) == 0


def test_which_modules_are_wrapped():
    model = _build(CASES[0])
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    enc = "sam.image_encoder."
    assert f"{enc}patch_embed.proj" not in wrapped
    assert {f"{enc}neck.0", f"{enc}neck.2"} <= wrapped
    for i in range(TINY.sam.depth):
        for t in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2"):
            assert f"{enc}blocks.{i}.{t}" in wrapped
    vision_head = "siglip.model.vision_model.head.attention.out_proj"
    assert vision_head not in wrapped
    for tower in ("vision_model", "text_model"):
        for i in range(2):
            for t in ("q_proj", "k_proj", "v_proj", "out_proj"):
                assert f"siglip.model.{tower}.encoder.layers.{i}.self_attn.{t}" in wrapped
    assert all(".lora_" not in n for n, p in model.named_parameters() if not p.requires_grad)
    # LoRA starts as the identity (B = 0): wrapping does not change the backbone's output.
    base = _build(CASES[-1]).eval()
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        a = model.sam.image_encoder(model.sam.normalize(x))
        b = base.sam.image_encoder(base.sam.normalize(x))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "depth, choice, expected",
    [(12, "full", list(range(12))), (12, "half", list(range(6, 12))), (27, "half", list(range(13, 27))), (2, "half", [1]), (12, "zero", [])],
)
def test_layer_indices(depth, choice, expected):
    assert layer_indices(depth, choice) == expected


def test_target_regexes_are_anchored_names():
    import re

    sam = sam_target_regex(12, "half")
    assert re.fullmatch(sam, "blocks.6.attn.qkv") and re.fullmatch(sam, "neck.2")
    assert not re.fullmatch(sam, "blocks.5.attn.qkv") and not re.fullmatch(sam, "patch_embed.proj")
    sig = siglip_target_regex(4, "full")
    assert re.fullmatch(sig, "encoder.layers.3.self_attn.out_proj")
    assert not re.fullmatch(sig, "head.attention.out_proj")
    assert sam_target_regex(12, "zero") is None and siglip_target_regex(4, "zero") is None
