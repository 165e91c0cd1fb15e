"""torch.compile of the backbones: same logits, same gradients, same checkpoint keys."""

from __future__ import annotations

import pytest
import torch

from rsrefseg.models.rsrefseg import build_model
from tests.models.helpers import forward, make_batch, tiny_model_config

# Inductor compiles C++ kernels for the three towers on the first call: about a minute on 2 cores.
pytestmark = pytest.mark.slow


def test_compiled_backbones_match_eager_and_keep_parameter_names():
    batch = make_batch(2)
    plain = build_model(tiny_model_config(["model.compile_backbones=false"]))
    fast = build_model(tiny_model_config(["model.compile_backbones=true"]))
    towers = [fast.sam.image_encoder, fast.siglip.model.vision_model, fast.siglip.model.text_model]
    assert all(t._compiled_call_impl is not None for t in towers)
    assert plain.sam.image_encoder._compiled_call_impl is None
    # Compiled in place: checkpoints of a compiled model load into an eager one and back.
    assert fast.trainable_state_dict().keys() == plain.trainable_state_dict().keys()

    compiling = []
    for model in (fast, plain):
        model.sam.image_encoder.blocks[0].register_forward_hook(
            lambda *_: compiling.append(torch.compiler.is_compiling())
        )
    logits_c = forward(fast, batch)
    logits_p = forward(plain, batch)
    assert compiling == [True, False]  # the compiled block ran under dynamo, the plain one did not
    torch.testing.assert_close(logits_c, logits_p, rtol=1e-4, atol=1e-4)

    fast.loss(logits_c, batch["mask"]).backward()
    plain.loss(logits_p, batch["mask"]).backward()
    grads_p = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    grads_c = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    assert grads_c.keys() == grads_p.keys()
    assert any("lora_" in n and "image_encoder" in n for n in grads_c)  # through the compiled graph
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-3, atol=1e-5, msg=name)
