"""SAM 2.1 backbone: equal to Meta's own model (official checkpoint layout), batched decoding,
gradients, bf16, and the checkpoint errors."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sam2.build_sam import build_sam2
from sam2.utils.transforms import SAM2Transforms

from rsrefseg.models.errors import ModelLoadError
from rsrefseg.models.presets import SAM2_HIERA_T, SAM2_TINY
from rsrefseg.models.sam2 import (
    SAM2_CHECKPOINTS_URL,
    Sam2Backbone,
    build_sam2_backbone,
    load_sam2_checkpoint,
    require_sam2_checkpoint,
)

PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.")
KEY = "model.sam_checkpoint"


def _meta_sam2(config: str, *, postprocessing: bool = False) -> torch.nn.Module:
    return build_sam2(config, ckpt_path=None, device="cpu", mode="eval", apply_postprocessing=postprocessing)


def _perturb(state: dict[str, torch.Tensor], seed: int) -> None:
    # Default inits leave tensors at zero/one (biases, norms, Hiera's pos_embed); add noise to
    # every float tensor so a comparison exercises every weight. state_dict() shares storage.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in state.values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.02)


def _ours(file_keys) -> list[str]:
    return [k for k in file_keys if k.startswith(PREFIXES) or k == "no_mem_embed"]


@pytest.fixture(scope="module")
def hiera_t(tmp_path_factory):
    """Meta's SAM 2.1 Hiera-T (perturbed), its official-layout file, and ours loaded from it."""
    torch.manual_seed(0)
    meta = _meta_sam2("configs/sam2.1/sam2.1_hiera_t.yaml")
    _perturb(meta.state_dict(), seed=1)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": meta.state_dict()}, path)
    ours = build_sam2_backbone(SAM2_HIERA_T).eval()
    load_sam2_checkpoint(ours, path, config_key=KEY, expected_file="sam2.1_hiera_tiny.pt")
    return meta, ours, path


def _meta_encode(meta, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SAM2ImagePredictor.set_image's feature path."""
    backbone_out = meta.forward_image(pixels)
    _, feats, _, sizes = meta._prepare_backbone_features(backbone_out)
    feats[-1] = feats[-1] + meta.no_mem_embed
    b = pixels.shape[0]
    maps = [f.permute(1, 2, 0).view(b, -1, *s) for f, s in zip(feats, sizes)]
    return maps[-1], maps[:-1]


def _meta_decode(meta, embed, high_res, sparse, mask):
    """Meta's decoder fed by Meta's prompt encoder, one prompt set per image, single mask."""
    _, dense = meta.sam_prompt_encoder(points=None, boxes=None, masks=mask)
    masks, _, _, _ = meta.sam_mask_decoder(
        image_embeddings=embed, image_pe=meta.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=False, repeat_image=False, high_res_features=high_res,
    )  # fmt: skip
    return masks


def test_hiera_t_equals_meta_sam2(hiera_t):
    meta, ours, path = hiera_t
    file_state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    state = ours.state_dict()
    assert len(state) == len(_ours(file_state)) and len(file_state) > len(state)  # the video model is left out
    for k, v in state.items():
        assert torch.equal(v, file_state[k]), k
    for name in ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder"):
        assert repr(getattr(ours, name)) == repr(getattr(meta, name)), name

    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (1, 3, 1024, 1024), generator=g, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # SAM2Transforms' torch.jit.script
        reference_pixels = SAM2Transforms(resolution=1024, mask_threshold=0.0)(image[0].permute(1, 2, 0).numpy())
    pixels = ours.normalize(image)
    torch.testing.assert_close(pixels[0], reference_pixels)

    sparse = torch.randn(1, 9, 256, generator=g)
    mask = torch.randn(1, 1, 256, 256, generator=g) * 4
    with torch.no_grad():
        embed, high_res = ours.encode(pixels)
        meta_embed, meta_high_res = _meta_encode(meta, pixels)
        assert embed.shape == (1, 256, 64, 64)
        assert [tuple(h.shape) for h in high_res] == [(1, 32, 256, 256), (1, 64, 128, 128)]
        torch.testing.assert_close(embed, meta_embed)
        for h, m in zip(high_res, meta_high_res):
            torch.testing.assert_close(h, m)
        for dense_mask in (mask, None):
            masks = ours.decode(embed, high_res, sparse, dense_mask)
            assert masks.shape == (1, 1, 256, 256)
            torch.testing.assert_close(masks, _meta_decode(meta, meta_embed, meta_high_res, sparse, dense_mask))


def _decoder_flags(sam) -> dict:
    d, neck = sam.sam_mask_decoder, sam.image_encoder.neck
    pe = neck.position_encoding
    return {
        "decoder": [getattr(d, a) for a in (
            "use_high_res_features", "pred_obj_scores", "use_multimask_token_for_obj_ptr",
            "dynamic_multimask_via_stability", "dynamic_multimask_stability_delta",
            "dynamic_multimask_stability_thresh",
        )] + [d.iou_prediction_head.sigmoid_output],  # fmt: skip
        "neck": [neck.fpn_top_down_levels, neck.fpn_interp_model, neck.fuse_type, sam.image_encoder.scalp],
        "pe": [type(pe), pe.num_pos_feats, pe.temperature, pe.normalize, pe.scale],
    }


@pytest.mark.parametrize("dynamic", [False, True])
def test_flags_equal_meta_builder(hiera_t, dynamic):
    meta = hiera_t[0] if not dynamic else _meta_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", postprocessing=True)
    ours = hiera_t[1] if not dynamic else build_sam2_backbone(SAM2_HIERA_T, dynamic_multimask=True)
    assert _decoder_flags(ours) == _decoder_flags(meta)
    assert ours.sam_mask_decoder.dynamic_multimask_via_stability is dynamic


# -- Tiny sizes --------------------------------------------------------------------------------


def _tiny(seed: int = 0, **kwargs) -> Sam2Backbone:
    torch.manual_seed(seed)
    sam = build_sam2_backbone(SAM2_TINY, **kwargs)
    _perturb(sam.state_dict(), seed + 1)
    return sam


IMG, EMB, LOW = SAM2_TINY.img_size, SAM2_TINY.embedding_size, SAM2_TINY.low_res_size  # 192 px: 12, 48


def _tiny_inputs(b: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (b, 3, IMG, IMG), generator=g, dtype=torch.uint8)
    return image, torch.randn(b, 6, 32, generator=g), torch.randn(b, 1, LOW, LOW, generator=g) * 4


@pytest.mark.parametrize("dynamic", [False, True])
def test_batched_decode_equals_per_sample(dynamic):
    sam = _tiny(dynamic_multimask=dynamic).eval()
    image, sparse, mask = _tiny_inputs(2)
    with torch.no_grad():
        embed, high_res = sam.encode(sam.normalize(image))
        for dense in (mask, None):
            batched = sam.decode(embed, high_res, sparse, dense)
            single = [
                sam.decode(embed[i : i + 1], [h[i : i + 1] for h in high_res], sparse[i : i + 1],
                           None if dense is None else dense[i : i + 1])
                for i in range(2)
            ]  # fmt: skip
            torch.testing.assert_close(batched, torch.cat(single), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(single[0], single[1])


def test_tiny_runs_end_to_end_and_gradients_skip_only_unused_parameters():
    sam = _tiny().train()
    image, sparse, mask = _tiny_inputs(2)
    embed, high_res = sam.encode(sam.normalize(image))
    assert embed.shape == (2, 32, EMB, EMB)
    assert [tuple(h.shape) for h in high_res] == [(2, 4, 4 * EMB, 4 * EMB), (2, 8, 2 * EMB, 2 * EMB)]
    masks = sam.decode(embed, high_res, sparse, mask)
    assert masks.shape == (2, 1, LOW, LOW) and masks.dtype == torch.float32
    (masks * torch.randn(masks.shape, generator=torch.Generator().manual_seed(7))).sum().backward()

    unused = {id(p) for p in sam.unused_decoder_parameters()}
    names = {n for n, p in sam.named_parameters() if id(p) in unused}
    assert names and all(
        n.startswith(("sam_mask_decoder.iou_prediction_head.", "sam_mask_decoder.pred_obj_score_head."))
        or n.startswith(tuple(f"sam_mask_decoder.output_hypernetworks_mlps.{i}." for i in (1, 2, 3)))
        for n in names
    )
    for n, p in sam.named_parameters():
        got_gradient = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if id(p) in unused:
            assert not got_gradient, n
        elif n.startswith(("image_encoder.", "sam_mask_decoder.", "no_mem_embed", "sam_prompt_encoder.mask_downscaling.")):
            # Trunk / neck / decoder / mask-prompt weights: where LoRA and fine-tuning act.
            assert got_gradient, n

    # Unused means it: changing them leaves the masks unchanged (in training mode).
    with torch.no_grad():
        before = sam.decode(embed, high_res, sparse, mask)
        for p in sam.unused_decoder_parameters():
            p.add_(1.0)
        assert torch.equal(sam.decode(embed, high_res, sparse, mask), before)


def test_bf16_module_encodes_and_decodes():
    sam = _tiny().eval()
    image, sparse, mask = _tiny_inputs(2)
    with torch.no_grad():
        reference = sam.decode(*sam.encode(sam.normalize(image)), sparse, mask)
        sam.to(torch.bfloat16)
        embed, high_res = sam.encode(sam.normalize(image))
        assert embed.dtype == torch.bfloat16 and all(h.dtype == torch.bfloat16 for h in high_res)
        assert sam.dense_positional_encoding().dtype == torch.bfloat16
        for dense in (mask, None):  # float32 prompts from a float32 caller
            masks = sam.decode(embed, high_res, sparse, dense)
            assert masks.dtype == torch.bfloat16 and masks.shape == (2, 1, LOW, LOW)
            assert torch.isfinite(masks).all()
    # Same model, only rounded: close to the float32 masks.
    scale = reference.abs().max()
    torch.testing.assert_close(
        sam.decode(embed, high_res, sparse, mask).float(), reference, atol=0.1 * float(scale), rtol=0
    )


# -- Checkpoint errors -------------------------------------------------------------------------


def _assert_instructions(msg: str, expected_file: str) -> None:
    assert KEY in msg and expected_file in msg and SAM2_CHECKPOINTS_URL in msg, msg


def test_unset_and_missing_paths(tmp_path):
    for unset in (None, ""):
        with pytest.raises(ModelLoadError, match=f"{KEY} is not set") as info:
            require_sam2_checkpoint(unset, config_key=KEY, expected_file="sam2.1_hiera_large.pt")
        _assert_instructions(str(info.value), "sam2.1_hiera_large.pt")
    missing = tmp_path / "sam2.1_hiera_large.pt"
    with pytest.raises(ModelLoadError, match="file not found") as info:
        load_sam2_checkpoint(_tiny(), missing, config_key=KEY, expected_file="sam2.1_hiera_large.pt")
    assert str(missing) in str(info.value)
    _assert_instructions(str(info.value), "sam2.1_hiera_large.pt")


def _wrong_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files that must be refused, and what each message must say."""
    state = _tiny().state_dict()
    files = {
        "missing key": ({"model": {k: v for k, v in state.items() if k != "sam_mask_decoder.iou_token.weight"}},
                        "sam_mask_decoder.iou_token.weight"),
        "no model dict": (state, 'no "model" state dict'),
        "pickled object": ({"model": object}, "refusing to unpickle"),
    }  # fmt: skip
    out = {}
    for what, (payload, says) in files.items():
        out[what] = (tmp_path / f"{what.replace(' ', '_')}.pt", says)
        torch.save(payload, out[what][0])
    out["not torch"] = (tmp_path / "notes.pt", "cannot read")
    out["not torch"][0].write_text("hello")
    return out


def test_wrong_files_raise_model_load_error(tmp_path):
    sam = _tiny()
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    for what, (path, says) in _wrong_files(tmp_path).items():
        with pytest.raises(ModelLoadError) as info:
            load_sam2_checkpoint(sam, path, config_key=KEY, expected_file="sam2.1_hiera_tiny.pt")
        msg = str(info.value)
        assert says in msg and str(path) in msg, what
        _assert_instructions(msg, "sam2.1_hiera_tiny.pt")
    # A refused file leaves the model untouched.
    assert all(torch.equal(v, before[k]) for k, v in sam.state_dict().items())


def test_hiera_s_file_is_refused_by_hiera_t(hiera_t, tmp_path):
    _, ours, _ = hiera_t
    path = tmp_path / "sam2.1_hiera_small.pt"
    torch.save({"model": _meta_sam2("configs/sam2.1/sam2.1_hiera_s.yaml").state_dict()}, path)
    before = ours.state_dict()["image_encoder.trunk.blocks.10.attn.qkv.weight"].clone()
    with pytest.raises(ModelLoadError, match="shape mismatches") as info:
        load_sam2_checkpoint(ours, path, config_key=KEY, expected_file="sam2.1_hiera_tiny.pt")
    msg = str(info.value)
    assert "image_encoder.trunk.blocks." in msg and "is it the right model size?" in msg, msg
    _assert_instructions(msg, "sam2.1_hiera_tiny.pt")
    assert torch.equal(ours.state_dict()["image_encoder.trunk.blocks.10.attn.qkv.weight"], before)


def test_sizes_meta_hiera_cannot_run_are_refused():
    # A global-attention block where a stage begins (query pooling) divides by zero in Hiera.
    with pytest.raises(ValueError, match="global_att_blocks"):
        build_sam2_backbone(replace(SAM2_HIERA_T, global_att_blocks=(3, 7)))
    with pytest.raises(ValueError, match="multiple of 32"):
        build_sam2_backbone(replace(SAM2_HIERA_T, img_size=1000))


def test_normalize_is_imagenet_on_unit_pixels():
    sam = _tiny()
    image = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 128, 128)
    expected = torch.tensor([(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    pixels = sam.normalize(image)
    assert pixels.shape == (1, 3, 128, 128) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0, :, 0, 0], expected)
