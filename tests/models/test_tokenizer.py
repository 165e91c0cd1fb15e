"""Phrase tokenizers: the tiny word-level one and the SigLIP (sentencepiece) path."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from rsrefseg.models.presets import TINY
from rsrefseg.models.tokenizer import TINY_WORDS, build_tiny_tokenizer, load_tokenizer, tiny_vocabulary
from tests.models.helpers import tokenize
from tests.models.helpers import PHRASES, siglip_tokenizer_dir, tiny_model_config

L = TINY.siglip.max_text_len


def test_tiny_tokenizer_pads_like_siglip():
    tok = load_tokenizer(tiny_model_config())
    enc = tokenize(tok, ["Vehicle in the parking lot", "light-duty vehicle"], max_length=L)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (2, L) and ids.dtype == mask.dtype == np.int64
    vocab = tiny_vocabulary()
    expected0 = [vocab[w] for w in ["vehicle", "in", "the", "parking", "lot", "</s>"]]
    assert ids[0, :6].tolist() == expected0  # lowercased, EOS appended
    assert (ids[0, 6:] == vocab["</s>"]).all()  # padded with </s>, like SigLIP
    assert mask[0].tolist() == [1] * 6 + [0] * (L - 6)
    assert ids[1, :4].tolist() == [vocab["light"], vocab["-"], vocab["duty"], vocab["vehicle"]]
    assert (ids < TINY.siglip.vocab_size).all()


def test_tiny_tokenizer_truncates_keeping_eos_and_maps_unknown_words():
    tok = load_tokenizer(tiny_model_config())
    enc = tokenize(tok, [" ".join(["car"] * 40), "zebra crossing"], max_length=L)
    assert enc["input_ids"].shape == (2, L)
    assert enc["input_ids"][0, -1] == tiny_vocabulary()["</s>"] and enc["attention_mask"][0].all()
    assert enc["input_ids"][1, 0] == tiny_vocabulary()["<unk>"]
    # Same call as the data pipeline makes directly.
    direct = tok(PHRASES, padding="max_length", truncation=True, max_length=L, return_tensors="np")
    assert direct["input_ids"].shape == (len(PHRASES), L)


def test_tiny_tokenizer_is_deterministic_and_picklable():
    a = load_tokenizer(tiny_model_config())
    b = pickle.loads(pickle.dumps(a))
    c = build_tiny_tokenizer(max_length=L, vocab_size=TINY.siglip.vocab_size)
    for other in (b, c):
        assert np.array_equal(tokenize(a, PHRASES, max_length=L)["input_ids"], tokenize(other, PHRASES, max_length=L)["input_ids"])
    assert len(tiny_vocabulary()) <= TINY.siglip.vocab_size
    assert len(set(TINY_WORDS)) == len(TINY_WORDS), "duplicate words shift ids"


def test_real_preset_loads_the_siglip_tokenizer_from_its_directory(tmp_path):
    path = siglip_tokenizer_dir(tmp_path)
    cfg = tiny_model_config(["model.preset=rsrefseg-b", f"model.siglip_path={path}"])
    tok = load_tokenizer(cfg)
    enc = tokenize(tok, PHRASES, max_length=64)
    assert enc["input_ids"].shape == (len(PHRASES), 64)
    assert (enc["attention_mask"].sum(1) < 64).all()
    again = pickle.loads(pickle.dumps(tok))
    assert np.array_equal(tokenize(again, PHRASES, max_length=64)["input_ids"], enc["input_ids"])


@pytest.mark.parametrize("which", ["unset", "missing"])
def test_real_preset_without_files_is_a_clear_error(tmp_path, which):
    from rsrefseg.models.errors import ModelLoadError

    overrides = ["model.preset=rsrefseg-b"] + ([f"model.siglip_path={tmp_path / 'nope'}"] if which == "missing" else [])
    with pytest.raises(ModelLoadError, match="model.siglip_path"):
        load_tokenizer(tiny_model_config(overrides))
