"""Helpers of the model tests: tiny configs and seeded input batches, built on the fly."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from rsrefseg.models.presets import TINY
from rsrefseg.datasets.pipeline import tokenize as tokenize_arrays
from rsrefseg.models.tokenizer import build_tiny_tokenizer
from rsrefseg.platform.config import Config, ModelConfig

PHRASES = [
    "vehicle in the parking lot",
    "light-duty vehicle along the road",
    "trees near the building on the left",
    "the lane marking",
]


def tiny_config(overrides: list[str] | None = None) -> Config:
    """A validated Config for the tiny preset with dotted overrides (model.lora.sam_rank=8 ...)."""
    return Config().replace(["model.preset=tiny", *(overrides or [])])


def tiny_model_config(overrides: list[str] | None = None) -> ModelConfig:
    return tiny_config(overrides).model


def make_batch(batch_size: int = 2, *, seed: int = 0, label: int = TINY.label_size) -> dict[str, torch.Tensor]:
    """A seeded tiny-preset batch: uint8 images, tokenized phrases, uint8 0/1 masks."""
    g = torch.Generator().manual_seed(seed)
    s = TINY.sam.img_size
    c = TINY.siglip.image_size
    tok = build_tiny_tokenizer(max_length=TINY.siglip.max_text_len, vocab_size=TINY.siglip.vocab_size)
    phrases = [PHRASES[i % len(PHRASES)] for i in range(batch_size)]
    enc = tokenize(tok, phrases, max_length=TINY.siglip.max_text_len)
    return {
        "sam_image": torch.randint(0, 256, (batch_size, 3, s, s), generator=g, dtype=torch.uint8),
        "siglip_image": torch.randint(0, 256, (batch_size, 3, c, c), generator=g, dtype=torch.uint8),
        "input_ids": torch.from_numpy(enc["input_ids"]),
        "attention_mask": torch.from_numpy(enc["attention_mask"]),
        "mask": (torch.rand(batch_size, label, label, generator=g) > 0.7).to(torch.uint8),
    }


def forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["sam_image"], batch["siglip_image"], batch["input_ids"], batch["attention_mask"])


def siglip_tokenizer_dir(tmp_path: Path) -> Path:
    """A SigLIP-style tokenizer directory (spiece.model + tokenizer config, as `save_pretrained`
    writes it) with a small sentencepiece model trained here: SigLIP's ids (pad 0, EOS 1, unk 2)."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    corpus = [p for p in PHRASES for _ in range(20)] + ["the red car near the tree", "a building along the river"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
    )  # fmt: skip
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    SiglipTokenizer(vocab_file=str(tmp_path / "spiece.model"), model_max_length=64).save_pretrained(tmp_path / "siglip")
    (tmp_path / "siglip" / "config.json").write_text('{"model_type": "siglip"}')
    return tmp_path / "siglip"


def tokenize(tokenizer, phrases: list[str], *, max_length: int) -> dict:
    """The pipeline's one `tokenize`, as the model's keyword inputs."""
    input_ids, attention_mask = tokenize_arrays(tokenizer, list(phrases), max_length)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
