"""RSRefSeg-2 at its tiny size: the architecture key, what trains, the loss terms, the cascaded
prompter's dense branch, checkpoints that know their architecture, letterboxed inputs."""

from __future__ import annotations

import math

import pytest
import torch

from rsrefseg.models.build import build_model
from rsrefseg.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rsrefseg.models.presets import TINY2, get_preset, input_sizes
from rsrefseg.models.rsrefseg2 import RSRefSeg2, masked_mean
from rsrefseg.models.tokenizer import build_tiny_tokenizer
from rsrefseg.platform.config import Config
from rsrefseg.platform.errors import ConfigError
from tests.models.helpers import PHRASES, tokenize


def config2(overrides: list[str] | None = None) -> Config:
    return Config().replace(["model.arch=rsrefseg2", "model.preset=tiny", *(overrides or [])])


def batch2(batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, c, label = TINY2.sam.img_size, TINY2.siglip.image_size, TINY2.label_size
    tok = build_tiny_tokenizer(max_length=TINY2.siglip.max_text_len, vocab_size=TINY2.siglip.vocab_size)
    enc = tokenize(tok, [PHRASES[i % len(PHRASES)] for i in range(batch_size)], max_length=TINY2.siglip.max_text_len)
    mask = torch.zeros(batch_size, label, label, dtype=torch.uint8)
    for i in range(batch_size):  # one square object each, at its own place
        mask[i, 8 + 4 * i : 30 + 4 * i, 10 : 34 + 2 * i] = 1
    return {
        "sam_image": torch.randint(0, 256, (batch_size, 3, s, s), generator=g, dtype=torch.uint8),
        "siglip_image": torch.randint(0, 256, (batch_size, 3, c, c), generator=g, dtype=torch.uint8),
        "input_ids": torch.from_numpy(enc["input_ids"]),
        "attention_mask": torch.from_numpy(enc["attention_mask"]),
        "mask": mask,
    }


def run(model, batch, **kwargs):
    return model(batch["sam_image"], batch["siglip_image"], batch["input_ids"], batch["attention_mask"], **kwargs)


@pytest.fixture(scope="module")
def model() -> RSRefSeg2:
    return build_model(config2().model)


def test_the_arch_key_builds_rsrefseg2_with_the_authors_defaults(model):
    assert isinstance(model, RSRefSeg2)
    resolved = config2().resolved()
    m, t = resolved.model, resolved.train
    assert (m.bce_weight, m.dice_weight) == (5.0, 5.0)
    assert (m.rsrefseg2.decorrelation_weight, m.rsrefseg2.contrastive_weight) == (0.5, 0.5)
    assert (m.lora.alpha, m.lora.dropout, m.lora.text_head) == (16.0, 0.0, True)
    assert (t.weight_decay, t.warmup_start_factor, t.min_lr_factor, t.cosine_start) == (0.05, 0.01, 0.01, 0.1)
    # RSRefSeg keeps what it had: no Dice, no flat stretch.
    plain = Config().resolved()
    assert (plain.model.dice_weight, plain.train.cosine_start) == (0.0, 0.0)
    # A key given explicitly wins over the architecture's default.
    assert config2(["model.dice_weight=1"]).resolved().model.dice_weight == 1.0


def test_a_preset_of_the_other_architecture_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"model.preset: rsrefseg2-l is a preset of the rsrefseg2 .*model.arch=rsrefseg2"):
        Config().replace(["model.preset=rsrefseg2-l"])
    with pytest.raises(ConfigError, match="model.preset: rsrefseg-b .* model.arch=rsrefseg"):
        Config().replace(["model.arch=rsrefseg2", "model.preset=rsrefseg-b"])
    with pytest.raises(ConfigError, match="model.activation_checkpointing: .*rsrefseg2 does not read it"):
        config2(["model.activation_checkpointing=true"])
    assert get_preset("tiny", "rsrefseg2") is TINY2 and get_preset("tiny").arch == "rsrefseg"
    assert input_sizes(config2().model).keep_ratio and not input_sizes(Config().model).keep_ratio


def test_forward_gives_logits_at_the_label_size_and_the_loss_inputs(model):
    batch = batch2()
    logits, aux = run(model, batch, return_aux=True)
    assert logits.shape == (2, TINY2.label_size, TINY2.label_size)
    assert aux["queries1"].shape == aux["queries2"].shape == (2, 3, TINY2.siglip.hidden_size)
    grid = TINY2.siglip.image_size // TINY2.siglip.patch_size
    assert aux["image_map"].shape == (2, TINY2.siglip.hidden_size, grid, grid)
    torch.testing.assert_close(run(model, batch), logits)  # the plain call: the same logits


def test_each_loss_term_is_weighted_by_its_key_and_a_zero_weight_leaves_it_out():
    batch = batch2()
    base = build_model(config2().model)
    logits, aux = run(base, batch, return_aux=True)
    terms = base.loss_terms(logits, batch["mask"], aux)
    assert set(terms) == {"bce", "dice", "decorrelation", "contrastive"}
    doubled = build_model(config2(["model.rsrefseg2.contrastive_weight=1.0", "model.bce_weight=10"]).model)
    doubled.load_trainable_state_dict(base.trainable_state_dict())
    terms2 = doubled.loss_terms(logits, batch["mask"], aux)
    torch.testing.assert_close(terms2["contrastive"], 2 * terms["contrastive"])
    torch.testing.assert_close(terms2["bce"], 2 * terms["bce"])
    off = build_model(config2(["model.rsrefseg2.decorrelation_weight=0", "model.rsrefseg2.contrastive_weight=0"]).model)
    assert set(off.loss_terms(logits, batch["mask"], aux)) == {"bce", "dice"}
    torch.testing.assert_close(base.loss(logits, batch["mask"], aux), sum(terms.values()))


def test_gradients_reach_exactly_the_trainable_parameters():
    model = build_model(config2().model)
    with torch.no_grad():  # LoRA B starts at zero, which zeroes A's gradient
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    batch = batch2(4)
    logits, aux = run(model, batch, return_aux=True)
    model.loss(logits, batch["mask"], aux).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # The contrastive bias is added to every logit of a softmax cross-entropy, which no constant
    # shift changes: its gradient is exactly 0 (as in the authors' code), though it is there.
    assert model.contrast_bias.grad is not None and abs(model.contrast_bias.grad.item()) < 1e-6
    assert with_grad - {"contrast_bias"} == trainable - {"contrast_bias"}
    for prefix in ("sam.image_encoder.trunk.", "sam.image_encoder.neck.", "siglip.model.vision_model.encoder.",
                   "siglip.model.text_model.encoder.", "siglip.model.text_model.head."):
        assert any(n.startswith(prefix) and ".lora_" in n for n in trainable), prefix
    assert not any(n.startswith("siglip.model.vision_model.head.") for n in trainable)  # never used
    for name in ("siglip.model.logit_scale", "contrast_log_scale", "prompter.image_pe", "prompter.prompt_embedding",
                 "sam.no_mem_embed"):
        assert name in trainable
    assert any(n.startswith("sam.sam_prompt_encoder.mask_downscaling.") for n in trainable)
    assert any(n.startswith("sam.sam_mask_decoder.transformer.") for n in trainable)


def test_without_the_dense_branch_its_unused_weights_stay_frozen():
    model = build_model(config2(["model.rsrefseg2.dense_prompt=false"]).model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert model.prompter.dense_conv is None
    assert "siglip.model.logit_scale" not in trainable
    assert not any(n.startswith(("siglip.model.text_model.head.", "sam.sam_prompt_encoder.mask_downscaling."))
                   for n in trainable)
    assert any(n.startswith("sam.sam_prompt_encoder.no_mask_embed.") for n in trainable)


def test_the_dense_prompt_is_siglips_matching_logit_of_the_refined_map(model):
    prompter = model.prompter.eval()
    b, c, (h, w) = 2, TINY2.siglip.hidden_size, prompter.grid
    refined, text = torch.randn(b, h * w, c), torch.randn(b, c)
    scale, bias = torch.tensor(2.0), torch.tensor(-1.5)
    with torch.no_grad():
        dense = prompter.dense_mask(refined, text, scale, bias, mask_size=3 * h)
        feature = prompter.dense_conv(refined.transpose(1, 2).reshape(b, c, h, w))
        # Upsampled before the cosine (the authors' "preup"), corners aligned.
        feature = torch.nn.functional.interpolate(feature, size=(3 * h, 3 * w), mode="bilinear", align_corners=True)
    assert dense.shape == (b, 1, 3 * h, 3 * w)
    cosine = torch.nn.functional.cosine_similarity(feature, text[:, :, None, None], dim=1)
    torch.testing.assert_close(dense[:, 0], cosine * math.exp(2.0) - 1.5, rtol=1e-4, atol=1e-4)
    prompter.train()


def test_masked_mean_pools_the_foreground_and_ignores_padding():
    feature_map = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    mask = torch.zeros(2, 8, 8, dtype=torch.uint8)
    mask[0, :4, :4] = 1  # the top-left quarter
    mask[1] = 255  # all padding: nothing pooled
    pooled = masked_mean(feature_map, mask)
    on_grid = torch.zeros(4, 4)
    on_grid[:2, :2] = 1
    torch.testing.assert_close(pooled[0], (feature_map[0] * on_grid).mean(dim=(1, 2)))
    assert pooled[1].abs().sum() == 0


def test_a_checkpoint_records_its_architecture_and_refuses_the_other(tmp_path, model):
    cfg = config2()
    folder = save_checkpoint(model, cfg, tmp_path / "ckpt")
    loaded, loaded_cfg = load_checkpoint(folder)
    assert isinstance(loaded, RSRefSeg2) and loaded_cfg.model.arch == "rsrefseg2"
    batch = batch2()
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, batch), run(model, batch))
    model.train()
    # The same weights under a config that says the other architecture: a clear refusal.
    config_file = folder / "config.yaml"
    config_file.write_text(config_file.read_text().replace("arch: rsrefseg2", "arch: rsrefseg"))
    with pytest.raises(CheckpointError, match="model.arch=rsrefseg2.*says model.arch=rsrefseg"):
        load_checkpoint(folder)


def test_missing_weight_files_name_the_key_the_file_and_where_to_get_it(tmp_path):
    from rsrefseg.models.errors import ModelLoadError
    from rsrefseg.models.presets import check_model_files

    cfg = Config().replace(["model.arch=rsrefseg2", "model.preset=rsrefseg2-l",
                            f"model.sam_checkpoint={tmp_path / 'nope.pt'}", f"model.siglip_path={tmp_path}"])
    with pytest.raises(ModelLoadError, match=r"model.sam_checkpoint: .*nope.pt.*sam2.1_hiera_large.pt.*github.com/facebookresearch/sam2"):
        check_model_files(cfg.model)
    (tmp_path / "sam2.1_hiera_large.pt").write_bytes(b"")
    cfg = cfg.replace([f"model.sam_checkpoint={tmp_path / 'sam2.1_hiera_large.pt'}", f"model.siglip_path={tmp_path / 'siglip2'}"])
    with pytest.raises(ModelLoadError, match=r"model.siglip_path: .*google/siglip2-so400m-patch16-512"):
        check_model_files(cfg.model)


def test_longest_padding_trims_the_text_to_the_batchs_longest_phrase():
    """text_padding=longest (the authors' padding=True): appending pads changes nothing; the
    pipeline's 64-position padding (max_length) is another input, so other logits."""
    batch = batch2()
    longest = build_model(config2().model).eval()
    fixed = build_model(config2(["model.rsrefseg2.text_padding=max_length"]).model).eval()
    fixed.load_trainable_state_dict(longest.trainable_state_dict())
    trimmed = dict(batch)
    length = int(batch["attention_mask"].sum(1).max())
    trimmed["input_ids"], trimmed["attention_mask"] = batch["input_ids"][:, :length], batch["attention_mask"][:, :length]
    assert length < batch["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(run(longest, batch), run(longest, trimmed))
        torch.testing.assert_close(run(fixed, trimmed), run(longest, batch))
        assert not torch.allclose(run(fixed, batch), run(longest, batch))
