"""Phrase tokenizers: SigLIP's own for the real presets, a fixed word-level one for `tiny`.

Both are Hugging Face tokenizers, picklable (they are shipped to Ray Data workers), and used as

    tok(phrases, padding="max_length", truncation=True, max_length=N, return_tensors="np")

or through `tokenize()`, which also fixes dtypes. The tiny tokenizer mirrors SigLIP's conventions:
an EOS `</s>` is appended, padding uses `</s>` too (id 1) up to max_length, so the text tower's
pooled token (position -1) is always an EOS/pad token, as in SigLIP training.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rsrefseg.models.errors import ModelLoadError
from rsrefseg.models.presets import get_preset
from rsrefseg.models.siglip import SIGLIP_REPO, require_siglip_dir
from rsrefseg.platform.config import ModelConfig

# SigLIP's sentencepiece ids: 0 <pad> (unused by SigLIP's tokenizer), 1 </s>, 2 <unk>.
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

# Words of remote-sensing referring phrases (RefSegRS / RRSIS-D style). Order fixes the ids:
# append new words at the end, never reorder, or tiny checkpoints stop matching their tokens.
TINY_WORDS = """
the a an of in on at to by from with and or is are that which this there its it
vehicle vehicles car cars van vans truck trucks bus buses boat boats ship ships plane planes
airplane airplanes aircraft airport runway helicopter train trains station
building buildings house houses roof roofs factory warehouse stadium church tower towers
road roads street streets lane lanes marking markings highway expressway crossing intersection
bridge bridges overpass path sidewalk railway track tracks
parking lot lots area areas space spaces square yard field fields court courts ground
tree trees vegetation grass lawn forest bush bushes shrub shrubs garden park farmland
water river lake pond pool harbor port dam coast beach sea
low light heavy duty light-duty heavy-duty - , .
storage tank tanks chimney chimneys windmill windmills golf baseball basketball tennis
soccer football service toll
along near next beside between behind above below under over across around inside outside
close far away adjacent surrounded surrounding opposite toward towards through into onto
left right top bottom upper lower middle center centre central corner side edge end
north south east west northern southern eastern western northeast northwest southeast southwest
first second third fourth fifth last one two three four five six seven eight nine ten
small large big little long short wide narrow tall huge tiny
white black gray grey red blue green yellow brown dark bright orange silver
all other both each single several many some only
parked moving driving located placed standing lying
closest nearest farthest largest smallest biggest longest leftmost rightmost topmost
""".split()


def tiny_vocabulary() -> dict[str, int]:
    """Token -> id for the tiny tokenizer: SigLIP's special ids first, then TINY_WORDS."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *TINY_WORDS):
        vocab.setdefault(token, len(vocab))
    return vocab


def build_tiny_tokenizer(*, max_length: int, vocab_size: int) -> PreTrainedTokenizerFast:
    """A deterministic word-level tokenizer (lowercased, whitespace/punctuation split)."""
    vocab = tiny_vocabulary()
    if len(vocab) > vocab_size:
        raise ValueError(f"tiny vocabulary has {len(vocab)} tokens, the text model only {vocab_size}")
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    # Whitespace splits on \w+|[^\w\s]+, so "light-duty" becomes light / - / duty (all in the vocab).
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="</s>",
        pad_token="</s>",
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The phrase tokenizer of the model preset (no network access for the real presets)."""
    preset = get_preset(model_cfg.preset)
    if not preset.pretrained:
        return build_tiny_tokenizer(max_length=preset.siglip.max_text_len, vocab_size=preset.siglip.vocab_size)
    path = require_siglip_dir(model_cfg.siglip_path, config_key="model.siglip_path")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # no spiece.model, sentencepiece missing, ...
        raise ModelLoadError(
            f"model.siglip_path: cannot load the SigLIP tokenizer from {path} ({exc}); the directory "
            f"must hold the full {SIGLIP_REPO} download (spiece.model and tokenizer config), and the "
            "sentencepiece package must be installed"
        ) from exc
