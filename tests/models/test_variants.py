"""model.variant: the paper's text vs the authors' code, each difference a key of its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rsrefseg.models.lora import layer_indices, siglip_target_regex
from rsrefseg.models.loss import mask_bce_loss, mask_dice_loss, mask_loss
from rsrefseg.models.presets import SAM_TINY
from rsrefseg.models.prompter import AttnPrompter
from rsrefseg.models.build import build_model
from rsrefseg.models.sam import build_sam
from rsrefseg.platform.config import VARIANTS, Config
from rsrefseg.platform.errors import ConfigError
from tests.models.helpers import forward, tiny_config, tiny_model_config
from tests.models.test_prompter import D1, GRID, _inputs

OFFICIAL = ["model.variant=official"]


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- config -------------------------------------------------------------------------------------


def test_variant_fills_only_the_keys_left_empty():
    cfg = tiny_config(OFFICIAL + ["model.lora.dropout=0.3", "train.weight_decay=0"])
    resolved = cfg.resolved()
    for key, value in VARIANTS["official"].items():
        got = resolved.flat()[key]
        if key == "model.lora.dropout":
            assert got == 0.3  # a single key still overrides the group
        elif key == "train.weight_decay":
            assert got == 0.0
        else:
            assert got == value, key
    # The config keeps what was given, so switching the variant later moves the whole group.
    assert cfg.to_dict()["model"]["prompter"]["gating"] is None
    paper = cfg.replace(["model.variant=paper"]).resolved()
    assert paper.model.prompter.gating == "paper" and paper.model.bce_weight == 1.0
    assert paper.model.lora.dropout == 0.3  # still the explicit value
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_both_variants_name_the_same_keys_and_params_show_resolved_values():
    assert VARIANTS["paper"].keys() == VARIANTS["official"].keys()
    flat = tiny_config(OFFICIAL).flat()
    assert flat["model.bce_weight"] == 5.0 and flat["train.cosine_per"] == "epoch"
    assert None not in {flat[k] for k in VARIANTS["paper"]}


@pytest.mark.parametrize(
    "override,key",
    [("model.variant=both", "model.variant"), ("model.prompter.gating=mixed", "model.prompter.gating"),
     ("model.lora.dropout=1.5", "model.lora.dropout"), ("model.dice_weight=-1", "model.dice_weight"),
     ("train.min_lr_factor=2", "train.min_lr_factor")],
)
def test_bad_variant_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config([override])


def test_a_config_with_no_loss_is_refused():
    with pytest.raises(ConfigError, match="no loss"):
        tiny_config(["model.bce_weight=0", "model.dice_weight=0"])


# -- model --------------------------------------------------------------------------------------


def test_paper_variant_is_the_model_as_first_built(batch):
    # The variant's defaults and every paper key given by hand build the same model, and it has
    # none of the official extras.
    by_hand = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in VARIANTS["paper"].items()
               if k.startswith("model.")]
    a, b = build_model(tiny_model_config()), build_model(tiny_model_config(["model.variant=official", *by_hand]))
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with torch.no_grad():
        torch.testing.assert_close(forward(a, batch), forward(b, batch), rtol=0, atol=0)
    trainable = _trainable(a)
    assert not any(n.startswith("sam.prompt_encoder.") for n in trainable)
    assert not any("text_model.head." in n for n in trainable)
    assert not any(n.startswith(("prompter.out_proj", "prompter.project_norm")) for n in trainable)


def test_official_variant_trains_what_the_authors_code_trains(batch):
    paper, official = build_model(tiny_model_config()), build_model(tiny_model_config(OFFICIAL))
    added = _trainable(official) - _trainable(paper)
    assert {n for n in added if n.startswith("prompter.out_proj.")} == {"prompter.out_proj.weight", "prompter.out_proj.bias"}
    assert any(n.startswith("prompter.project_norm.") for n in added)
    assert any(n.startswith("sam.prompt_encoder.mask_downscaling.") for n in added)
    assert any(n.startswith("siglip.model.text_model.head.lora_") for n in added)
    # The prompt encoder's unused point embeddings stay frozen: they never see a gradient.
    assert not any("point_embeddings" in n or "not_a_point" in n for n in added)
    # Every trainable parameter of the official model gets a gradient.
    with torch.no_grad():
        for name, p in official.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    official.loss(forward(official, batch), batch["mask"]).backward()
    no_grad = {n for n, p in official.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    assert not no_grad
    with torch.no_grad():
        assert not torch.allclose(forward(paper, batch), forward(official, batch))


def test_dense_prompt_off_trains_the_no_mask_embedding_instead():
    model = build_model(tiny_model_config(OFFICIAL + ["model.prompter.dense_prompt=false"]))
    encoder = {n for n in _trainable(model) if n.startswith("sam.prompt_encoder.")}
    assert encoder == {"sam.prompt_encoder.no_mask_embed.weight"}


def test_each_official_switch_changes_the_output_alone(batch):
    base = build_model(tiny_model_config())
    with torch.no_grad():
        reference = forward(base, batch)
    for switch in ("model.prompter.sparse_branch=official", "model.prompter.gating=official"):
        model = build_model(tiny_model_config([switch]))
        with torch.no_grad():
            assert not torch.allclose(forward(model, batch), reference), switch


def _official_v_attn(v, t_global, t_local, text_mask, logit_scale, logit_bias, **_):
    """The authors' gating, one token at a time: no residual on v_global, v_local averaged with v."""
    def act(t):
        return logit_scale.exp() * F.cosine_similarity(v, t.unsqueeze(1), dim=-1).unsqueeze(-1) + logit_bias

    v_global = v * torch.sigmoid(act(t_global))
    locals_ = []
    for b in range(v.shape[0]):
        terms = [v[b] * torch.sigmoid(act(t_local[:, l])[b]) for l in range(t_local.shape[1]) if text_mask[b, l]]
        locals_.append((v[b] + torch.stack(terms).mean(0)) / 2)
    return torch.cat([torch.stack(locals_), v_global, v], dim=-1)


def test_official_sparse_branch_matches_the_authors_layout():
    sam = build_sam(SAM_TINY)
    torch.manual_seed(0)
    prompter = AttnPrompter(in_dim=D1, prompt_dim=SAM_TINY.prompt_embed_dim, downsample_rate=2,
                            sparse_branch="official", gating="official").eval()
    inputs = _inputs()
    with torch.no_grad():
        sparse, _ = prompter(**inputs, prompt_encoder=sam.prompt_encoder)
        x = _official_v_attn(**inputs).transpose(1, 2).reshape(2, 3 * D1, GRID, GRID)
        x = prompter.project_norm(prompter.project(x)) + sam.prompt_encoder.pe_layer((GRID, GRID)).unsqueeze(0)
        expected = prompter.out_proj(prompter.downsample(x)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(sparse, expected, atol=1e-5, rtol=1e-5)
        # Unrestricted tokens: a plain conv last, not a GELU (which never goes below -0.17).
        assert sparse.min() < -0.2
        # SAM's positional encoding is part of the tokens.
        sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(2)
        moved, _ = prompter(**inputs, prompt_encoder=sam.prompt_encoder)
        assert not torch.allclose(moved, sparse)


# -- LoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth,half_depth,expected",
    [(27, "ceil", list(range(13, 27))), (27, "floor", list(range(14, 27))), (12, "floor", list(range(6, 12))),
     (12, "ceil", list(range(6, 12)))],
)
def test_half_is_the_last_ceil_or_floor_half(depth, half_depth, expected):
    assert layer_indices(depth, "half", half_depth) == expected


def test_text_head_regex_adds_the_head_only_when_the_tower_is_tuned():
    assert siglip_target_regex(4, "full", head=True).endswith("|head")
    assert siglip_target_regex(4, "zero", head=True) is None


def test_fixed_alpha_scales_by_alpha_over_rank():
    for rank in (4, 8):
        model = build_model(tiny_model_config(OFFICIAL + [f"model.lora.sam_rank={rank}"]))
        qkv = model.sam.image_encoder.blocks[0].attn.qkv
        assert qkv.scaling["default"] == pytest.approx(16 / rank)
        assert qkv.lora_dropout["default"].p == pytest.approx(0.1)
    paper = build_model(tiny_model_config(["model.lora.sam_rank=4"]))
    assert paper.sam.image_encoder.blocks[0].attn.qkv.scaling["default"] == pytest.approx(1.0)


# -- loss ---------------------------------------------------------------------------------------


def test_dice_is_zero_for_a_perfect_answer_and_weighs_small_objects():
    mask = torch.zeros(2, 16, 16, dtype=torch.uint8)
    mask[0, :8] = 1  # a large object
    mask[1, 0, 0] = 1  # a one-pixel object
    perfect = torch.where(mask > 0, 30.0, -30.0)
    assert mask_dice_loss(perfect, mask) < 1e-3
    nothing = torch.full((2, 16, 16), -30.0)
    # Predicting nothing costs the one-pixel sample as much Dice as the large one...
    per_sample = [mask_dice_loss(nothing[i : i + 1], mask[i : i + 1]).item() for i in range(2)]
    assert per_sample[0] > 0.9 and per_sample[1] > 0.3
    # ...while its BCE is tiny.
    assert mask_bce_loss(nothing[1:], mask[1:]) < 0.2
    # An empty target answered with nothing is no loss.
    assert mask_dice_loss(nothing[:1], torch.zeros(1, 16, 16, dtype=torch.uint8)) < 1e-3


def test_loss_weights_combine_the_terms():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 8, generator=g)
    mask = (torch.rand(2, 8, 8, generator=g) > 0.5).to(torch.uint8)
    bce, dice = mask_bce_loss(logits, mask), mask_dice_loss(logits, mask)
    torch.testing.assert_close(mask_loss(logits, mask), bce)
    torch.testing.assert_close(mask_loss(logits, mask, bce_weight=5, dice_weight=1), 5 * bce + dice)
    torch.testing.assert_close(mask_loss(logits, mask, bce_weight=0, dice_weight=2), 2 * dice)
    model = build_model(tiny_model_config(OFFICIAL + ["model.dice_weight=1"]))
    torch.testing.assert_close(model.loss(logits, mask), 5 * bce + dice)
