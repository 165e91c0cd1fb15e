"""AttnPrompter against a direct transcription of the paper's equations 3-4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rsrefseg.models.presets import SAM_TINY
from rsrefseg.models.prompter import AttnPrompter, matching_logits, sparse_token_count
from rsrefseg.models.sam import build_sam

D1, GRID, L = 8, 6, 5


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, GRID * GRID, D1, generator=g)
    t_global = torch.randn(batch, D1, generator=g)
    t_local = torch.randn(batch, L, D1, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])[:batch]
    scale, bias = torch.tensor([0.7]), torch.tensor([-0.3])
    return dict(v=v, grid=(GRID, GRID), t_global=t_global, t_local=t_local, text_mask=mask, logit_scale=scale, logit_bias=bias)


def _prompter(**kw):
    torch.manual_seed(0)
    return AttnPrompter(in_dim=D1, prompt_dim=SAM_TINY.prompt_embed_dim, **kw).eval()


def _naive_v_attn(v, t_global, t_local, text_mask, logit_scale, logit_bias, **_):
    """Eq. 3-4, one token at a time: v_local = mean_l(v * σ(a_l)) + v over real tokens."""
    def act(t):  # [B, d] -> [B, N, 1]
        cos = F.cosine_similarity(v, t.unsqueeze(1), dim=-1).unsqueeze(-1)
        return logit_scale.exp() * cos + logit_bias

    v_global = v * torch.sigmoid(act(t_global)) + v
    locals_ = []
    for b in range(v.shape[0]):
        terms = [v[b] * torch.sigmoid(act(t_local[:, l])[b]) for l in range(t_local.shape[1]) if text_mask[b, l]]
        locals_.append(torch.stack(terms).mean(0) + v[b])
    return torch.cat([v_global, torch.stack(locals_), v], dim=-1), act(t_global)


def test_sparse_prompt_matches_the_equations():
    sam = build_sam(SAM_TINY)
    prompter = _prompter(downsample_rate=2)
    inputs = _inputs()
    with torch.no_grad():
        sparse, _ = prompter(**inputs, prompt_encoder=sam.prompt_encoder)
        v_attn, _ = _naive_v_attn(**inputs)
        x = v_attn.transpose(1, 2).reshape(2, 3 * D1, GRID, GRID)
        expected = prompter.downsample(prompter.project(x)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(sparse, expected, atol=1e-5, rtol=1e-5)


def test_dense_prompt_is_the_resized_global_activation_through_sams_mask_encoder():
    sam = build_sam(SAM_TINY)
    prompter = _prompter()
    inputs = _inputs()
    with torch.no_grad():
        _, dense = prompter(**inputs, prompt_encoder=sam.prompt_encoder)
        _, a_global = _naive_v_attn(**inputs)
        act_map = a_global.reshape(2, 1, GRID, GRID)
        act_map = F.interpolate(act_map, size=sam.prompt_encoder.mask_input_size, mode="bilinear", align_corners=False)
        expected = sam.prompt_encoder.mask_downscaling(act_map)
    e = SAM_TINY.embedding_size
    assert dense.shape == (2, SAM_TINY.prompt_embed_dim, e, e)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)


def test_padded_tokens_do_not_matter():
    sam = build_sam(SAM_TINY)
    prompter = _prompter()
    a = _inputs()
    b = dict(a, t_local=a["t_local"].clone())
    b["t_local"][0, 3:] = 100.0  # sample 0 has 3 real tokens
    with torch.no_grad():
        sa, da = prompter(**a, prompt_encoder=sam.prompt_encoder)
        sb, db = prompter(**b, prompt_encoder=sam.prompt_encoder)
    assert torch.equal(sa, sb) and torch.equal(da, db)
    # ...while a real token does.
    b["t_local"][0, 0] = 100.0
    with torch.no_grad():
        sc, _ = prompter(**b, prompt_encoder=sam.prompt_encoder)
    assert not torch.allclose(sa, sc)


def test_all_padding_phrase_is_finite():
    sam = build_sam(SAM_TINY)
    inputs = dict(_inputs(), text_mask=torch.zeros(2, L, dtype=torch.long))
    with torch.no_grad():
        sparse, dense = _prompter()(**inputs, prompt_encoder=sam.prompt_encoder)
    assert torch.isfinite(sparse).all() and torch.isfinite(dense).all()


def test_matching_logits_is_siglips_scaled_cosine():
    v = torch.tensor([[[3.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[1.0, 0.0]]])
    out = matching_logits(v, t, torch.tensor([2.0]), torch.tensor([-1.0]))
    # exp(2) * cos + (-1), with cos = 1 for the first patch and 0 for the second.
    torch.testing.assert_close(out, torch.tensor([[[torch.e**2 - 1.0], [-1.0]]]))


@pytest.mark.parametrize("grid, rate, expected", [(27, 2, 14 * 14), (27, 4, 7 * 7), (27, 8, 4 * 4), (16, 4, 16), (16, 8, 4)])
def test_sparse_token_count(grid, rate, expected):
    assert sparse_token_count(grid, rate) == expected


def test_bad_rate_rejected():
    with pytest.raises(ValueError):
        AttnPrompter(in_dim=4, prompt_dim=8, downsample_rate=3)
