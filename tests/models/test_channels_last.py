"""Channels-last memory format changes the strides of convolutions' weights and inputs, not results."""

from __future__ import annotations

import torch

from rsrefseg.models.build import build_model
from tests.models.helpers import forward, make_batch, tiny_model_config


def _logits_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = forward(model, batch)
    model.loss(logits, batch["mask"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _is_nhwc(weight: torch.Tensor) -> bool:
    # Both checks: a 1x1 kernel is contiguous in either format, so it would prove nothing.
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_channels_last_model_matches_the_plain_one():
    batch = make_batch(2)
    plain = build_model(tiny_model_config(["model.channels_last=false"]))
    nhwc = build_model(tiny_model_config(["model.channels_last=true"]))
    frozen = {
        "sam patch embedding": nhwc.sam.image_encoder.patch_embed.proj.weight,
        "sam neck 3x3": nhwc.sam.image_encoder.neck[2].weight,
    }
    trainable = next(
        m.weight for m in nhwc.prompter.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
    )
    # Nothing changes before the first forward (DeepSpeed's start-up broadcast needs plain strides).
    assert not any(_is_nhwc(w) for w in frozen.values())

    logits_p, grads_p = _logits_and_grads(plain, batch)
    logits_c, grads_c = _logits_and_grads(nhwc, batch)
    for where, weight in frozen.items():
        assert _is_nhwc(weight), where
    assert trainable.is_contiguous()  # ZeRO-2 owns trainable storage: left as it is
    assert not _is_nhwc(plain.sam.image_encoder.patch_embed.proj.weight)
    torch.testing.assert_close(logits_c, logits_p, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-4, atol=1e-5, msg=name)


def test_channels_last_images_reach_the_patch_embedding_in_nhwc():
    model = build_model(tiny_model_config(["model.channels_last=true"]))
    seen = []
    model.sam.image_encoder.patch_embed.proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        forward(model, make_batch(2))
    assert seen == [True]
