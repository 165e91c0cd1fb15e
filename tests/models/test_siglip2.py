"""RSRefSeg-2's SigLIP 2 (google/siglip2-so400m-patch16-512): loading, refusals, Gemma tokenizer.

Everything is built offline: a tiny random `SiglipModel` with SigLIP 2's structure (model_type
"siglip", Gemma's special ids) saved with `save_pretrained`, and a small BPE tokenizer with
Gemma's special tokens and ids (0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>) saved as
`GemmaTokenizer` (tokenizer.json + tokenizer_config.json) into the same folder.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, GemmaTokenizer, SiglipConfig, SiglipModel

import rsrefseg.models.tokenizer as tokenizer_module
from rsrefseg.models import presets
from rsrefseg.models.errors import ModelLoadError
from rsrefseg.models.presets import SIGLIP2_SO400M_512, get_preset
from rsrefseg.models.siglip import (
    SIGLIP2_REPO,
    SIGLIP_REPO,
    SiglipEncoder,
    build_random_siglip,
    check_siglip_sizes,
    load_siglip,
    siglip_config,
)
from rsrefseg.models.sizes import SiglipSizes
from rsrefseg.models.tokenizer import load_tokenizer
from tests.models.helpers import PHRASES, siglip_tokenizer_dir, tiny_model_config, tokenize

# SigLIP 2's structure at toy sizes: 64 px / patch 16 -> a 4x4 grid, 64 text positions.
SIGLIP2_TINY = SiglipSizes(
    image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_heads=2,
    vision_layers=2, text_layers=2, vocab_size=512, max_text_len=64,
)  # fmt: skip
L = SIGLIP2_TINY.max_text_len
PAD, EOS, BOS, UNK = 0, 1, 2, 3
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
# How transformers' SigLIP 2 conversion (convert_siglip2_to_hf.py) configures Gemma's tokenizer.
HF_SIGLIP2 = dict(add_bos_token=False, add_eos_token=True, padding_side="right", model_input_names=["input_ids"])
# Gemma's own conventions: BOS first, no EOS, and no padding side saved (GemmaTokenizer's default: left).
GEMMA_DEFAULTS = dict(add_bos_token=True, add_eos_token=False)


def gemma_tokenizer(**kwargs) -> GemmaTokenizer:
    """A small BPE with Gemma's special tokens, ids and pipeline (spaces -> "▁", case kept)."""
    backend = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_previous")  # training only
    letters = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-,.▁"))
    trainer = BpeTrainer(vocab_size=200, special_tokens=GEMMA_SPECIALS, initial_alphabet=letters, show_progress=False)
    backend.train_from_iterator([p for p in PHRASES for _ in range(10)] + ["the red car near the tree"], trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges, **kwargs)


def random_siglip2(sizes: SiglipSizes = SIGLIP2_TINY) -> SiglipModel:
    torch.manual_seed(0)
    model = build_random_siglip(sizes, repo=SIGLIP2_REPO)
    with torch.no_grad():  # SigLIP inits these to zero; make sure they really load.
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.7)
    return model


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory) -> tuple[Path, SiglipModel]:
    """A folder shaped like `hf download google/siglip2-so400m-patch16-512`, at toy sizes."""
    path = tmp_path_factory.mktemp("siglip2") / "siglip2-so400m-patch16-512"
    model = random_siglip2()
    model.save_pretrained(path)
    gemma_tokenizer(**HF_SIGLIP2).save_pretrained(path)
    return path, model


def test_siglip2_folder_loads_with_identical_weights(siglip2_dir):
    path, reference = siglip2_dir
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "siglip" and config["text_config"]["pad_token_id"] == PAD
    loaded = load_siglip(path, SIGLIP2_TINY, repo=SIGLIP2_REPO)
    ours, ref = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == ref.keys()
    for k in ours:
        assert torch.equal(ours[k], ref[k]), k
    assert loaded.dtype == torch.float32
    encoder = SiglipEncoder(model=loaded)
    assert encoder.grid == (4, 4) and encoder.image_size == 64


def test_siglip2_size_mismatch_names_the_keys(siglip2_dir):
    path, _ = siglip2_dir
    with pytest.raises(ModelLoadError) as info:
        load_siglip(path, SIGLIP2_SO400M_512, config_key="model.siglip_path", repo=SIGLIP2_REPO)
    msg = str(info.value)
    for needle in ("model.siglip_path", str(path), "vision_config.image_size=64 (expected 512)",
                   "text_config.vocab_size=512 (expected 256000)", f"hf download {SIGLIP2_REPO} --local-dir"):
        assert needle in msg, (needle, msg)
    assert "vision_config.patch_size" not in msg  # 16 == 16
    # Head counts leave no trace in the weight shapes; the config check catches them.
    with pytest.raises(ModelLoadError, match=r"vision_config.num_attention_heads=2 \(expected 4\)"):
        load_siglip(path, dataclasses.replace(SIGLIP2_TINY, num_heads=4), repo=SIGLIP2_REPO)


def test_check_siglip_sizes_on_siglip2_configs():
    assert check_siglip_sizes(siglip_config(SIGLIP2_SO400M_512, repo=SIGLIP2_REPO), SIGLIP2_SO400M_512) == []
    # SigLIP 2's config.json writes projection_size out (== hidden size); a different one is refused.
    base = siglip_config(SIGLIP2_SO400M_512, repo=SIGLIP2_REPO).to_dict()
    for projection, problems in ((1152, []), (768, ["text_config.projection_size=768 (expected 1152)"])):
        text = {**base["text_config"], "projection_size": projection}
        config = SiglipConfig(text_config=text, vision_config=base["vision_config"])
        assert check_siglip_sizes(config, SIGLIP2_SO400M_512) == problems


def _naflex_dir(path: Path) -> Path:
    from transformers import Siglip2Config, Siglip2Model

    s = SIGLIP2_TINY
    common = dict(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                  num_hidden_layers=2, num_attention_heads=s.num_heads)  # fmt: skip
    text = dict(common, vocab_size=s.vocab_size, max_position_embeddings=L, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    vision = dict(common, patch_size=s.patch_size, num_patches=16)
    Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).save_pretrained(path)
    return path


@pytest.mark.parametrize("repo", [SIGLIP2_REPO, SIGLIP_REPO])
def test_naflex_siglip2_folder_is_a_clear_error(tmp_path, repo):
    path = _naflex_dir(tmp_path / "siglip2-naflex")
    assert json.loads((path / "config.json").read_text())["model_type"] == "siglip2"
    with pytest.raises(ModelLoadError) as info:
        load_siglip(path, SIGLIP2_TINY, config_key="model.siglip_path", repo=repo)
    msg = str(info.value)
    for needle in ("model.siglip_path", str(path), "model_type 'siglip2'", "NaFlex", f"fixed-resolution {repo}",
                   f"hf download {repo} --local-dir"):
        assert needle in msg, (needle, msg)


def test_other_model_types_and_unreadable_configs_are_clear_errors(tmp_path):
    cases = {"clip": ('{"model_type": "clip"}', "model_type 'clip'"), "broken": ("{not json", "cannot read")}
    for name, (text, needle) in cases.items():
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(text)
        with pytest.raises(ModelLoadError) as info:
            load_siglip(path, SIGLIP2_TINY, repo=SIGLIP2_REPO)
        msg = str(info.value)
        assert needle in msg and str(path) in msg and "model.siglip_path" in msg and SIGLIP2_REPO in msg, msg


# -- Gemma tokenizer ---------------------------------------------------------------------------


def _use_siglip2_preset(monkeypatch, path: Path) -> SimpleNamespace:
    """A pretrained SigLIP 2 preset stand-in (Preset may not have `siglip_repo` yet) and its config."""
    preset = SimpleNamespace(name="rsrefseg2-test", pretrained=True, siglip=SIGLIP2_TINY, siglip_repo=SIGLIP2_REPO)
    monkeypatch.setattr(tokenizer_module, "get_preset", lambda name, arch="": preset)
    return SimpleNamespace(preset=preset.name, siglip_path=str(path))


@pytest.fixture(scope="module")
def gemma_defaults_dir(siglip2_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gemma_defaults")
    shutil.copy(siglip2_dir[0] / "config.json", path / "config.json")
    gemma_tokenizer(**GEMMA_DEFAULTS).save_pretrained(path)
    assert "padding_side" not in json.loads((path / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(path, local_files_only=True).padding_side == "left"  # Gemma's default
    return path


@pytest.mark.parametrize("variant", ["hf_siglip2", "gemma_defaults"])
def test_gemma_tokenizer_under_the_pipeline_call(monkeypatch, siglip2_dir, gemma_defaults_dir, variant):
    path = siglip2_dir[0] if variant == "hf_siglip2" else gemma_defaults_dir
    tok = load_tokenizer(_use_siglip2_preset(monkeypatch, path))
    assert type(tok).__name__ == "GemmaTokenizer"
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (PAD, EOS, BOS, UNK)
    assert tok.padding_side == "right"  # whatever the folder says (Gemma's class default is left)
    enc = tokenize(tok, PHRASES, max_length=L)  # the pipeline's call
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (len(PHRASES), L) and ids.dtype == mask.dtype == np.int64
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any() and (row[n:] == PAD).all(), row  # right padding with <pad>
        assert row[-1] == PAD  # SigLIP's pooled (last) position is a pad
        if variant == "hf_siglip2":  # no BOS, EOS appended
            assert row[0] != BOS and row[n - 1] == EOS and BOS not in row
        else:  # BOS first, no EOS
            assert row[0] == BOS and EOS not in row
        assert UNK not in row
    direct = tok(PHRASES, padding="max_length", truncation=True, max_length=L, return_tensors="np")
    assert np.array_equal(direct["input_ids"], ids)
    again = pickle.loads(pickle.dumps(tok))  # shipped to Ray Data workers
    assert again.padding_side == "right"
    assert np.array_equal(tokenize(again, PHRASES, max_length=L)["input_ids"], ids)


def test_gemma_tokenizer_keeps_case_and_truncates_keeping_eos(monkeypatch, siglip2_dir):
    tok = load_tokenizer(_use_siglip2_preset(monkeypatch, siglip2_dir[0]))
    ids = tokenize(tok, ["Vehicle in the Parking lot", "vehicle in the parking lot", "the car " * 50], max_length=L)
    ids = ids["input_ids"]
    assert not np.array_equal(ids[0], ids[1])  # no lowercasing: phrases are tokenized as given
    assert ids[2, -1] == EOS and PAD not in ids[2]  # truncated to 64 with the EOS kept last


def test_siglip2_tokenizer_errors_name_the_files_and_the_repo(monkeypatch, tmp_path, siglip2_dir):
    model_only = tmp_path / "model_only"
    model_only.mkdir()
    shutil.copy(siglip2_dir[0] / "config.json", model_only / "config.json")
    siglip1_tok = siglip_tokenizer_dir(tmp_path)  # spiece.model, no tokenizer.json
    no_config = tmp_path / "no_tokenizer_config"
    shutil.copytree(siglip2_dir[0], no_config)
    (no_config / "tokenizer_config.json").unlink()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(siglip2_dir[0], corrupt)
    (corrupt / "tokenizer.json").write_text("{not json")
    cases = {model_only: "has no tokenizer.json, tokenizer_config.json", siglip1_tok: "has no tokenizer.json",
             no_config: "has no tokenizer_config.json", corrupt: "cannot load the tokenizer"}  # fmt: skip
    for path, needle in cases.items():
        with pytest.raises(ModelLoadError) as info:
            load_tokenizer(_use_siglip2_preset(monkeypatch, path))
        msg = str(info.value)
        for expected in (needle, "model.siglip_path", str(path), "tokenizer.json", f"hf download {SIGLIP2_REPO}"):
            assert expected in msg, (expected, msg)
        assert "spiece.model" not in msg and "sentencepiece" not in msg, msg


def test_siglip_preset_on_a_siglip2_folder_asks_for_spiece_model(siglip2_dir):
    cfg = tiny_model_config(["model.preset=rsrefseg-b", f"model.siglip_path={siglip2_dir[0]}"])
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(cfg)
    msg = str(info.value)
    assert "has no spiece.model" in msg and f"hf download {SIGLIP_REPO}" in msg and SIGLIP2_REPO not in msg, msg


@pytest.mark.parametrize("name", ["rsrefseg2-t", "rsrefseg2-s", "rsrefseg2-b+", "rsrefseg2-l"])
def test_rsrefseg2_presets_use_siglip2(monkeypatch, tmp_path, name):
    """Checks the lead's presets once they exist (skipped before)."""
    try:
        preset = get_preset(name)
    except ValueError:
        pytest.skip(f"preset {name} not defined yet")
    assert preset.pretrained and preset.siglip == SIGLIP2_SO400M_512
    assert getattr(preset, "siglip_repo", SIGLIP_REPO) == SIGLIP2_REPO == getattr(presets, "SIGLIP2_REPO", SIGLIP2_REPO)
    (tmp_path / "config.json").write_text('{"model_type": "siglip"}')
    with pytest.raises(ModelLoadError, match=f"has no tokenizer.json.*hf download {SIGLIP2_REPO}"):
        load_tokenizer(SimpleNamespace(preset=name, siglip_path=str(tmp_path)))


def test_rsrefseg2_toy_preset_uses_the_tiny_tokenizer():
    from rsrefseg.models.tokenizer import build_tiny_tokenizer

    cfg = tiny_model_config(["model.arch=rsrefseg2"])
    sizes = get_preset(cfg.preset, cfg.arch).siglip
    expected = build_tiny_tokenizer(max_length=sizes.max_text_len, vocab_size=sizes.vocab_size)
    got = tokenize(load_tokenizer(cfg), PHRASES, max_length=sizes.max_text_len)["input_ids"]
    assert np.array_equal(got, tokenize(expected, PHRASES, max_length=sizes.max_text_len)["input_ids"])
