"""SAM builder and the batched mask decoder."""

from __future__ import annotations

import pytest
import torch

from rsrefseg.models.presets import SAM_TINY
from rsrefseg.models.sam import SamSizes, build_sam


def _randomize(module: torch.nn.Module, seed: int) -> None:
    # Default inits leave some tensors at zero/one (LayerNorm, biases); randomize everything so
    # the comparison exercises every weight.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("batch_size, num_sparse", [(1, 4), (3, 16), (4, 1)])
def test_batched_decoder_equals_segment_anything_per_sample(batch_size, num_sparse):
    torch.manual_seed(0)
    sam = build_sam(SAM_TINY).eval()
    _randomize(sam.mask_decoder, 1)
    c, e = SAM_TINY.prompt_embed_dim, SAM_TINY.embedding_size
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(batch_size, c, e, e, generator=g)
    sparse = torch.randn(batch_size, num_sparse, c, generator=g)
    dense = torch.randn(batch_size, c, e, e, generator=g)

    with torch.no_grad():
        batched = sam.decode_masks(emb, sparse, dense)
        reference = torch.cat(
            [
                sam.mask_decoder(
                    image_embeddings=emb[i : i + 1],
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse[i : i + 1],
                    dense_prompt_embeddings=dense[i : i + 1],
                    multimask_output=False,
                )[0]
                for i in range(batch_size)
            ]
        )
    assert batched.shape == (batch_size, 1, 4 * e, 4 * e)
    assert reference.shape == batched.shape
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-5)


def test_unused_decoder_parameters_do_not_affect_masks():
    sam = build_sam(SAM_TINY).eval()
    c, e = SAM_TINY.prompt_embed_dim, SAM_TINY.embedding_size
    args = (torch.randn(2, c, e, e), torch.randn(2, 3, c), torch.randn(2, c, e, e))
    with torch.no_grad():
        before = sam.decode_masks(*args)
        for p in sam.unused_decoder_parameters():
            p.add_(1.0)
        after = sam.decode_masks(*args)
    assert torch.equal(before, after)
    names = {n for n, p in sam.mask_decoder.named_parameters() if any(p is q for q in sam.unused_decoder_parameters())}
    assert names and all(n.startswith(("iou_prediction_head.", "output_hypernetworks_mlps.")) for n in names)
    assert not any(n.startswith("output_hypernetworks_mlps.0.") for n in names)


def test_build_sam_sizes_are_parameters():
    sizes = SamSizes(
        img_size=96, patch_size=8, embed_dim=48, depth=3, num_heads=3, global_attn_indexes=(2,),
        window_size=6, prompt_embed_dim=32, mask_in_chans=8, decoder_depth=1, decoder_mlp_dim=40,
        decoder_num_heads=4, iou_head_hidden_dim=24,
    )  # fmt: skip
    sam = build_sam(sizes)
    assert len(sam.image_encoder.blocks) == 3
    assert sam.image_encoder.pos_embed.shape == (1, 12, 12, 48)
    assert sam.prompt_encoder.image_embedding_size == (12, 12)
    assert sam.prompt_encoder.mask_input_size == (48, 48)
    assert len(sam.mask_decoder.transformer.layers) == 1
    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        assert sam.image_encoder(sam.normalize(x)).shape == (2, 32, 12, 12)


def test_dense_positional_encoding_survives_a_bf16_cast():
    sam = build_sam(SAM_TINY)
    torch.testing.assert_close(sam.dense_positional_encoding(), sam.prompt_encoder.get_dense_pe())
    half = build_sam(SAM_TINY)
    half.load_state_dict(sam.state_dict())
    half = half.to(torch.bfloat16)
    pe = half.dense_positional_encoding()
    assert pe.dtype == torch.bfloat16
    # Reference: segment-anything's float32 path on the same (bf16-rounded) frequencies.
    buf = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    buf.copy_(buf.to(torch.bfloat16).float())
    torch.testing.assert_close(pe.float(), sam.prompt_encoder.get_dense_pe(), atol=8e-3, rtol=0)
