"""Real-preset loading: official SAM .pth files and local SigLIP directories, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from segment_anything import sam_model_registry
from transformers import SiglipModel

from rsrefseg.models.errors import ModelLoadError
from rsrefseg.models.presets import SAM_TINY, SAM_VIT_B, SAM_VIT_L, SIGLIP_TINY, build_backbones, check_model_files
from rsrefseg.models.sam import build_sam, load_sam_checkpoint
from rsrefseg.models.siglip import SiglipSizes, build_random_siglip, load_siglip
from rsrefseg.models.tokenizer import load_tokenizer
from rsrefseg.platform.config import Config

SAM_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


@pytest.fixture(scope="module")
def vit_b_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """segment-anything's own ViT-B (random init), saved the way the official file is."""
    torch.manual_seed(0)
    state = sam_model_registry["vit_b"]().state_dict()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def our_vit_b():
    return build_sam(SAM_VIT_B)


def test_sam_vit_b_checkpoint_loads_through_our_builder(vit_b_file, our_vit_b):
    path, reference = vit_b_file
    ours = our_vit_b.state_dict()
    assert ours.keys() == reference.keys()
    assert all(ours[k].shape == reference[k].shape for k in ours)
    load_sam_checkpoint(our_vit_b, path, expected_file="sam_vit_b_01ec64.pth")
    for k, v in our_vit_b.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_sam_vit_l_layout_matches_the_registry():
    # Keys and shapes on the meta device: no 300M-parameter allocation.
    with torch.device("meta"):
        ours = build_sam(SAM_VIT_L).state_dict()
        reference = sam_model_registry["vit_l"]().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def _wrong_files(tmp_path: Path, vit_b_state: dict[str, torch.Tensor]) -> dict[str, Path]:
    files = {}
    tiny = build_sam(SAM_TINY).state_dict()  # a different model size: missing keys, other shapes
    files["other size"] = tmp_path / "tiny_sam.pth"
    torch.save(tiny, files["other size"])
    files["truncated state dict"] = tmp_path / "missing_key.pth"
    torch.save({k: v for k, v in vit_b_state.items() if not k.startswith("mask_decoder.")}, files["truncated state dict"])
    files["wrong shape"] = tmp_path / "wrong_shape.pth"
    torch.save({**vit_b_state, "image_encoder.pos_embed": torch.zeros(1, 64, 64, 1024)}, files["wrong shape"])
    files["random pth"] = tmp_path / "random.pth"
    torch.save({"foo": torch.zeros(3)}, files["random pth"])
    small = tmp_path / "small.pth"
    torch.save(tiny, small)
    files["truncated file"] = tmp_path / "truncated.pth"
    files["truncated file"].write_bytes(small.read_bytes()[:2000])
    files["not torch"] = tmp_path / "notes.pth"
    files["not torch"].write_text("hello")
    files["pickled object"] = tmp_path / "object.pth"
    torch.save({"model": object}, files["pickled object"])
    return files


def test_wrong_sam_files_raise_model_load_error(tmp_path, vit_b_file, our_vit_b):
    before = {k: v.clone() for k, v in list(our_vit_b.state_dict().items())[:3]}
    for what, path in _wrong_files(tmp_path, vit_b_file[1]).items():
        with pytest.raises(ModelLoadError) as info:
            load_sam_checkpoint(our_vit_b, path, config_key="model.sam_checkpoint", expected_file="sam_vit_b_01ec64.pth")
        msg = str(info.value)
        assert str(path) in msg, what
        assert "model.sam_checkpoint" in msg and "sam_vit_b_01ec64.pth" in msg and SAM_URL in msg, what
    # A refused file leaves the model untouched.
    for k, v in before.items():
        assert torch.equal(our_vit_b.state_dict()[k], v)


@pytest.mark.parametrize("preset, expected_file", [("rsrefseg-b", "sam_vit_b_01ec64.pth"), ("rsrefseg-l", "sam_vit_l_0b3195.pth")])
def test_missing_paths_fail_fast_with_instructions(tmp_path, preset, expected_file):
    cfg = Config().replace([f"model.preset={preset}"]).model
    for check in (check_model_files, build_backbones):
        with pytest.raises(ModelLoadError, match="model.sam_checkpoint is not set") as info:
            check(cfg)
        assert expected_file in str(info.value) and SAM_URL in str(info.value)

    cfg.sam_checkpoint = str(tmp_path / expected_file)
    with pytest.raises(ModelLoadError, match="file not found") as info:
        build_backbones(cfg)
    assert str(tmp_path / expected_file) in str(info.value)

    (tmp_path / expected_file).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="model.siglip_path is not set") as info:
        build_backbones(cfg)
    assert "hf download google/siglip-so400m-patch14-384 --local-dir" in str(info.value)

    with pytest.raises(ModelLoadError, match="model.siglip_path"):
        load_tokenizer(cfg)
    with pytest.raises(ModelLoadError, match="model.siglip_path is not set"):
        check_model_files(cfg)
    check_model_files(Config().model)  # tiny: nothing to check


# -- SigLIP ------------------------------------------------------------------------------------


@pytest.fixture
def siglip_dir(tmp_path) -> tuple[Path, SiglipModel]:
    torch.manual_seed(0)
    model = build_random_siglip(SIGLIP_TINY)
    with torch.no_grad():  # SigLIP inits these to zero; make sure they really load.
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.7)
    path = tmp_path / "siglip"
    model.save_pretrained(path)
    return path, model


def test_siglip_directory_loads_with_identical_weights(siglip_dir):
    path, reference = siglip_dir
    loaded = load_siglip(path, SIGLIP_TINY)
    ours, ref = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == ref.keys()
    for k in ours:
        assert torch.equal(ours[k], ref[k]), k
    assert loaded.dtype == torch.float32


def test_siglip_errors_name_the_key_and_the_download(tmp_path, siglip_dir):
    path, _ = siglip_dir
    cases = {}
    cases["unset"] = (None, "is not set")
    cases["no dir"] = (tmp_path / "nowhere", "directory not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["no config"] = (empty, "config.json")

    other = SiglipSizes(**{**SIGLIP_TINY.__dict__, "hidden_size": 48, "intermediate_size": 96})
    other_dir = tmp_path / "other"
    build_random_siglip(other).save_pretrained(other_dir)
    cases["other size"] = (other_dir, "hidden_size=48")

    weights = path / "model.safetensors"
    state = load_file(weights)
    missing_dir = tmp_path / "missing"
    missing_dir.mkdir()
    (missing_dir / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, missing_dir / "model.safetensors", metadata={"format": "pt"})
    cases["missing keys"] = (missing_dir, "missing keys")

    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    (corrupt_dir / "config.json").write_text((path / "config.json").read_text())
    (corrupt_dir / "model.safetensors").write_bytes(weights.read_bytes()[:1000])
    cases["corrupt"] = (corrupt_dir, "cannot load SigLIP")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((path / "config.json").read_text())
    cases["no weights"] = (no_weights, "cannot load SigLIP")

    for what, (p, needle) in cases.items():
        with pytest.raises(ModelLoadError) as info:
            load_siglip(p, SIGLIP_TINY, config_key="model.siglip_path")
        msg = str(info.value)
        assert needle in msg, (what, msg)
        assert "model.siglip_path" in msg and "hf download google/siglip-so400m-patch14-384" in msg, what
        if p is not None:
            assert str(p) in msg, what
