"""The composed model at the tiny preset: shapes, what trains, determinism, ablation switches."""

from __future__ import annotations

import pytest
import torch

from rsrefseg.models.presets import TINY, input_sizes
from rsrefseg.models.prompter import sparse_token_count
from rsrefseg.models.build import build_model
from tests.models.helpers import forward, make_batch, tiny_model_config


def test_forward_shape_and_loss(batch):
    model = build_model(tiny_model_config())
    logits = forward(model, batch)
    assert logits.shape == (2, TINY.label_size, TINY.label_size)
    assert logits.dtype == torch.float32
    loss = model.loss(logits, batch["mask"])
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_label_size_override(batch):
    model = build_model(tiny_model_config(), label_size=48)
    assert forward(model, batch).shape == (2, 48, 48)
    assert input_sizes(tiny_model_config(), 48).label == 48
    assert input_sizes(tiny_model_config()).label == TINY.label_size


def test_gradients_reach_exactly_the_trainable_parameters(batch):
    model = build_model(tiny_model_config())
    # LoRA B starts at zero, which zeroes the gradient of A; make it nonzero so every adapter
    # on the path shows a gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    model.loss(forward(model, batch), batch["mask"]).backward()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    # What trains: LoRA adapters, the prompter and SAM's mask decoder; nothing else.
    for name in trainable:
        assert ".lora_" in name or name.startswith(("prompter.", "sam.mask_decoder.")), name
    assert any(n.startswith("prompter.") for n in trainable)
    assert any(n.startswith("sam.mask_decoder.transformer.") for n in trainable)
    for prefix in ("sam.image_encoder.", "siglip.model.vision_model.", "siglip.model.text_model."):
        assert any(n.startswith(prefix) and ".lora_" in n for n in trainable), prefix
    assert not any(n.startswith("sam.prompt_encoder.") for n in trainable)


def test_adamw_step_changes_only_trainable_weights(batch):
    model = build_model(tiny_model_config())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.loss(forward(model, batch), batch["mask"]).backward()
    opt.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone():
    rng_before = torch.get_rng_state()
    a = build_model(tiny_model_config(["model.init_seed=3"]))
    b = build_model(tiny_model_config(["model.init_seed=3"]))
    assert torch.equal(torch.get_rng_state(), rng_before)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = build_model(tiny_model_config(["model.init_seed=4"]))
    key = "sam.image_encoder.blocks.0.attn.qkv.base_layer.weight"
    assert not torch.equal(sa[key], c.state_dict()[key])


@pytest.mark.parametrize("rate", [2, 4, 8])
def test_sparse_token_count_follows_downsampling_rate(rate, batch):
    model = build_model(tiny_model_config([f"model.prompter.downsample_rate={rate}"]))
    seen = {}
    model.prompter.register_forward_hook(lambda mod, args, out: seen.update(sparse=out[0], dense=out[1]))
    forward(model, batch)
    grid = TINY.siglip.grid
    expected = {2: (grid // 2) ** 2, 4: (grid // 4) ** 2, 8: (grid // 8) ** 2}[rate]
    assert sparse_token_count(grid, rate) == expected
    assert seen["sparse"].shape == (2, expected, TINY.sam.prompt_embed_dim)
    e = TINY.sam.embedding_size
    assert seen["dense"].shape == (2, TINY.sam.prompt_embed_dim, e, e)


def test_dense_prompt_off_uses_no_mask_embedding_and_changes_output(batch):
    on = build_model(tiny_model_config(["model.prompter.dense_prompt=true"])).eval()
    off = build_model(tiny_model_config(["model.prompter.dense_prompt=false"])).eval()
    seen = {}
    off.prompter.register_forward_hook(lambda mod, args, out: seen.update(dense=out[1]))
    with torch.no_grad():
        out_on, out_off = forward(on, batch), forward(off, batch)
    no_mask = off.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    assert torch.equal(seen["dense"], no_mask.expand_as(seen["dense"]))
    assert (out_on - out_off).abs().max() > 1e-4


def test_text_changes_output():
    model = build_model(tiny_model_config()).eval()
    b = make_batch(2)
    other = make_batch(2)
    b2 = dict(b, input_ids=other["input_ids"].flip(0), attention_mask=other["attention_mask"].flip(0))
    with torch.no_grad():
        assert (forward(model, b) - forward(model, b2)).abs().max() > 1e-5


def test_parameter_counts_and_trainable_state_dict():
    model = build_model(tiny_model_config())
    trainable, total = model.parameter_counts()
    assert 0 < trainable < total
    sd = model.trainable_state_dict()
    assert sum(v.numel() for k, v in sd.items() if "running_" not in k and "num_batches" not in k) == trainable
    # BatchNorm running statistics travel with the prompter weights.
    assert any(k.endswith("running_mean") for k in sd)
    with pytest.raises(ValueError, match="missing"):
        model.load_trainable_state_dict({k: v for k, v in list(sd.items())[1:]})
    k0 = next(k for k in sd if k.endswith("weight"))
    with pytest.raises(ValueError, match="shape"):
        model.load_trainable_state_dict({**sd, k0: torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        model.load_trainable_state_dict({**sd, "bogus.weight": torch.zeros(1)})


def test_bf16_model_runs_forward_and_backward(batch):
    # DeepSpeed casts the whole module to bf16; uint8 inputs must follow the weights' dtype.
    model = build_model(tiny_model_config()).to(torch.bfloat16)
    logits = forward(model, batch)
    assert logits.dtype == torch.bfloat16
    loss = model.loss(logits, batch["mask"])
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
