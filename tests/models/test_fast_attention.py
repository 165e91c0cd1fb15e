"""The SDPA route through SAM's attention computes what segment-anything's own code computes."""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention

from rsrefseg.models.fast_attention import use_sdpa_attention
from rsrefseg.models.build import build_model
from tests.models.helpers import forward, make_batch, tiny_model_config


def _sam_attention_pair(size: tuple[int, int], seed: int = 0) -> tuple[Attention, Attention]:
    torch.manual_seed(seed)
    plain = Attention(dim=32, num_heads=4, use_rel_pos=True, input_size=size)
    with torch.no_grad():  # zero-initialised by default: make the bias matter
        plain.rel_pos_h.normal_()
        plain.rel_pos_w.normal_()
    fast = Attention(dim=32, num_heads=4, use_rel_pos=True, input_size=size)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def _assert_same_values_and_gradients(plain: Attention, fast: Attention) -> None:
    # A non-square grid, so rows and columns cannot be swapped unnoticed.
    x = torch.randn(3, 6, 5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(fast(x2), plain(x), rtol=1e-5, atol=1e-5)
    plain(x).square().sum().backward()
    fast(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    # The bias tables get the same gradient, however the bias is applied.
    torch.testing.assert_close(fast.rel_pos_h.grad, plain.rel_pos_h.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.rel_pos_w.grad, plain.rel_pos_w.grad, rtol=1e-4, atol=1e-4)


def test_sdpa_attention_matches_segment_anything_with_relative_positions():
    plain, fast = _sam_attention_pair((6, 5))
    assert use_sdpa_attention(fast) == 1
    _assert_same_values_and_gradients(plain, fast)


def test_model_switch_changes_the_path_not_the_result():
    batch = make_batch(2)
    fast = build_model(tiny_model_config(["model.sdpa_attention=true"]))
    plain = build_model(tiny_model_config(["model.sdpa_attention=false"]))  # fold_rel_pos (on) is moot
    attn = [m for m in fast.sam.image_encoder.modules() if isinstance(m, Attention)]
    assert attn and all("forward" in vars(m) for m in attn)  # routed through SDPA
    assert not any("forward" in vars(m) for m in plain.sam.image_encoder.modules() if isinstance(m, Attention))
    fast.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(fast, batch), forward(plain, batch), rtol=1e-4, atol=1e-4)


def test_folded_rel_pos_matches_segment_anything_values_and_gradients():
    plain, fast = _sam_attention_pair((6, 5))
    assert use_sdpa_attention(fast, fold_rel_pos=True) == 1
    assert "forward" in vars(fast)  # routed, so the comparison below compares two paths
    _assert_same_values_and_gradients(plain, fast)  # no bias tensor is ever built on this path


def test_folded_qk_is_padded_for_fused_kernels_and_reproduces_the_bias():
    from rsrefseg.models.fast_attention import decomposed_rel_pos_bias, folded_rel_pos_qk

    torch.manual_seed(1)
    h, w, dim, heads = 4, 3, 8, 2
    q, k = torch.randn(2, 2, heads, h * w, dim).unbind(0)
    rel_h, rel_w = torch.randn(2 * h - 1, dim), torch.randn(2 * w - 1, dim)
    qf, kf = folded_rel_pos_qk(q, k, rel_h, rel_w, (h, w), scale=0.5)
    assert qf.shape[-1] == kf.shape[-1] == 16  # 8 + 4 + 3 = 15, padded to a multiple of 8
    bias = decomposed_rel_pos_bias(q.reshape(2 * heads, h * w, dim), rel_h, rel_w, (h, w)).view(2, heads, h * w, h * w)
    torch.testing.assert_close(qf @ kf.transpose(-1, -2), 0.5 * q @ k.transpose(-1, -2) + bias)


def test_model_switch_fold_rel_pos_keeps_the_logits():
    batch = make_batch(2)
    folded = build_model(tiny_model_config(["model.fold_rel_pos=true"]))
    plain = build_model(tiny_model_config(["model.sdpa_attention=false"]))
    folded.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(folded, batch), forward(plain, batch), rtol=1e-4, atol=1e-4)
