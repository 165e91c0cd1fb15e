"""The SDPA route through SAM's attention computes what segment-anything's own code computes."""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention

from rsrefseg.models.fast_attention import use_sdpa_attention
from rsrefseg.models.rsrefseg import build_model
from tests.models.helpers import forward, make_batch, tiny_model_config


def test_sdpa_attention_matches_segment_anything_with_relative_positions():
    torch.manual_seed(0)
    plain = Attention(dim=32, num_heads=4, use_rel_pos=True, input_size=(6, 5))
    with torch.no_grad():  # zero-initialised by default: make the bias matter
        plain.rel_pos_h.normal_()
        plain.rel_pos_w.normal_()
    fast = Attention(dim=32, num_heads=4, use_rel_pos=True, input_size=(6, 5))
    fast.load_state_dict(plain.state_dict())
    assert use_sdpa_attention(fast) == 1
    x = torch.randn(3, 6, 5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(fast(x2), plain(x), rtol=1e-5, atol=1e-5)
    plain(x).square().sum().backward()
    fast(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)


def test_model_switch_changes_the_path_not_the_result():
    batch = make_batch(2)
    fast = build_model(tiny_model_config(["model.sdpa_attention=true"]))
    plain = build_model(tiny_model_config(["model.sdpa_attention=false"]))
    attn = [m for m in fast.sam.image_encoder.modules() if isinstance(m, Attention)]
    assert attn and all("forward" in vars(m) for m in attn)  # routed through SDPA
    assert not any("forward" in vars(m) for m in plain.sam.image_encoder.modules() if isinstance(m, Attention))
    fast.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(fast, batch), forward(plain, batch), rtol=1e-4, atol=1e-4)
