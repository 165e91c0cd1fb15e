"""Phrase tokenizers: the checkpoint's own for the pretrained presets, a fixed word-level one for
the toy `tiny` preset (of either architecture).

All are Hugging Face tokenizers, picklable (they are shipped to Ray Data workers), and used as

    tok(phrases, padding="max_length", truncation=True, max_length=N, return_tensors="np")

or through `tokenize()` (datasets.pipeline), which also asks for the attention mask and fixes
dtypes. SigLIP's text tower pools the LAST position and was trained on right padding to 64 tokens
with the padding attended, so `load_tokenizer` always pads and truncates on the right.

What each produces under that call (tests/models/test_tokenizer.py, test_siglip2.py):

- tiny (word-level, SigLIP's conventions): lowercased words, EOS `</s>` (1) appended, padded with
  `</s>` (1); the pooled token (position -1) is always EOS/pad.
- SigLIP (`google/siglip-so400m-patch14-384`, sentencepiece `spiece.model`): lowercased with
  punctuation removed (SiglipTokenizer's do_lower_case), no BOS, EOS `</s>` (1) appended,
  padded with `</s>` (1).
- SigLIP 2 (`google/siglip2-so400m-patch16-512`, Gemma's tokenizer from `tokenizer.json` +
  `tokenizer_config.json`; ids 0 `<pad>`, 1 `<eos>`, 2 `<bos>`, 3 `<unk>`): what is added comes
  from the folder's files. Transformers' SigLIP 2 conversion (convert_siglip2_to_hf.py:
  add_bos_token=False, add_eos_token=True, padding_side="right") gives no BOS and EOS `<eos>`
  (1) appended, padding `<pad>` (0) on the right: "phrase <eos> <pad> ... <pad>", so
  the pooled token is `<pad>` (or `<eos>` when truncated, as truncation keeps the EOS). Gemma's
  own defaults (BOS `<bos>` first, no EOS) would give "<bos> phrase <pad> ...". Gemma's class
  default is LEFT padding when tokenizer_config.json names none; `load_tokenizer` overrides it.
  It keeps case and punctuation: SigLIP 2 was trained on lowercased text, but the Gemma
  tokenizer of a model_type "siglip" folder does not lowercase, so phrases are tokenized as given
  (transformers' Siglip2Tokenizer, which adds lowercasing, is only chosen for model_type "siglip2").
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rsrefseg.models.errors import ModelLoadError
from rsrefseg.models.presets import get_preset
from rsrefseg.models.siglip import SIGLIP2_REPO, SIGLIP_REPO, require_siglip_dir
from rsrefseg.platform.config import ModelConfig

# The tokenizer files each checkpoint's folder must hold, and what they are.
TOKENIZER_FILES = {
    SIGLIP_REPO: (("spiece.model",), "SigLIP's sentencepiece tokenizer"),
    SIGLIP2_REPO: (("tokenizer.json", "tokenizer_config.json"), "SigLIP 2's Gemma tokenizer"),
}

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
    """The phrase tokenizer of the model preset (no network access for the real presets).

    Pretrained presets read it from `model.siglip_path`; the preset's `siglip_repo` (SigLIP's by
    default) decides which files must be there and what the errors tell users to download.
    """
    # "tiny" names a toy preset of each architecture; both use the tiny tokenizer at the same sizes.
    preset = get_preset(model_cfg.preset, getattr(model_cfg, "arch", ""))
    if not preset.pretrained:
        return build_tiny_tokenizer(max_length=preset.siglip.max_text_len, vocab_size=preset.siglip.vocab_size)
    repo = getattr(preset, "siglip_repo", SIGLIP_REPO)
    path = require_siglip_dir(model_cfg.siglip_path, config_key="model.siglip_path", repo=repo)
    files, what = TOKENIZER_FILES.get(repo, ((), "tokenizer"))
    needs = f"the full {repo} download ({what}: {', '.join(files) or 'tokenizer files'}"
    needs += f"; `hf download {repo} --local-dir <dir>`)"
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise ModelLoadError(f"model.siglip_path: {path} has no {', '.join(missing)}; the directory must hold {needs}")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # unreadable files, sentencepiece missing, ...
        extra = ", and the sentencepiece package must be installed" if repo == SIGLIP_REPO else ""
        raise ModelLoadError(
            f"model.siglip_path: cannot load the tokenizer from {path} ({exc}); the directory must hold {needs}{extra}"
        ) from exc
    # SigLIP pools the last position, trained on right padding (Gemma's class default is left).
    tok.padding_side = "right"
    tok.truncation_side = "right"
    return tok
