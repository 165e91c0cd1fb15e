"""Activation checkpointing recomputes the backbone blocks in backward and changes no gradient."""

from __future__ import annotations

import torch

from rsrefseg.models.build import build_model
from tests.models.helpers import forward, make_batch, tiny_model_config


def _step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Logits, trainable gradients, and how often SAM's first attention ran (forward + recompute)."""
    calls = []
    hook = model.sam.image_encoder.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    logits = forward(model, batch)
    model.loss(logits, batch["mask"]).backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logits.detach(), grads, len(calls)


def test_checkpointed_backbones_give_the_same_gradients():
    batch = make_batch(2)
    plain = build_model(tiny_model_config(["model.activation_checkpointing=false"]))
    ckpt = build_model(tiny_model_config(["model.activation_checkpointing=true"]))
    logits_p, grads_p, calls_p = _step(plain, batch)
    logits_c, grads_c, calls_c = _step(ckpt, batch)
    assert calls_p == 1 and calls_c == 2  # the checkpointed block ran again in backward
    torch.testing.assert_close(logits_c, logits_p)
    assert grads_p.keys() == grads_c.keys()
    # LoRA adapters inside the checkpointed blocks get their gradients through the recompute.
    assert any("lora_" in n and "image_encoder.blocks" in n for n in grads_c)
    assert any("lora_" in n and "text_model" in n for n in grads_c)
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-6)


def test_no_recompute_without_gradients():
    model = build_model(tiny_model_config(["model.activation_checkpointing=true"]))
    calls = []
    model.sam.image_encoder.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        forward(model, make_batch(1))
    assert len(calls) == 1
