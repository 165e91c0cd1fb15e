"""SigLIP image and text encoders (transformers' `SiglipModel`), as RSRefSeg uses them.

The image side gives the patch-feature map `v` (no pooling); the text side gives `t_global`,
SigLIP's pooled text embedding (last position through the text head: the embedding SigLIP matches
against images), and `t_local`, the per-token last hidden states.

Two checkpoints share this code: RSRefSeg's SigLIP (`SIGLIP_REPO`, a 32k sentencepiece vocabulary)
and RSRefSeg-2's SigLIP 2 (`SIGLIP2_REPO`, the fixed-resolution release: its config.json says
`model_type: "siglip"`, so it is a plain `SiglipModel` with Gemma's 256k vocabulary). The NaFlex
SigLIP 2 releases (`model_type: "siglip2"`, transformers' `Siglip2Model`, variable patch counts)
are a different architecture and are refused with a `ModelLoadError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import SiglipConfig, SiglipModel

from rsrefseg.models.errors import ModelLoadError
from rsrefseg.models.sizes import SiglipSizes

SIGLIP_REPO = "google/siglip-so400m-patch14-384"
SIGLIP2_REPO = "google/siglip2-so400m-patch16-512"

# The text-config token ids that go with each checkpoint's tokenizer (metadata only: SigLIP's
# forward pass reads none of them; it pools the last position whatever token sits there).
# SigLIP's sentencepiece: 1 (</s>) is both EOS and padding; there is no BOS.
# SigLIP 2's Gemma tokenizer: 0 <pad>, 1 <eos>, 2 <bos>.
TEXT_SPECIAL_IDS = {
    SIGLIP_REPO: dict(pad_token_id=1, eos_token_id=1, bos_token_id=None),
    SIGLIP2_REPO: dict(pad_token_id=0, eos_token_id=1, bos_token_id=2),
}


def siglip_config(sizes: SiglipSizes, *, repo: str = SIGLIP_REPO) -> SiglipConfig:
    """A `SiglipConfig` with these sizes (the layout of so400m when given its sizes) and the
    special token ids of `repo`'s tokenizer (SigLIP's unless `repo` is `SIGLIP2_REPO`)."""
    text = dict(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.num_heads,
        max_position_embeddings=sizes.max_text_len,
        **TEXT_SPECIAL_IDS.get(repo, TEXT_SPECIAL_IDS[SIGLIP_REPO]),
    )
    vision = dict(
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.num_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
    )
    return SiglipConfig(text_config=text, vision_config=vision)


def build_random_siglip(sizes: SiglipSizes, *, repo: str = SIGLIP_REPO) -> SiglipModel:
    """A randomly initialized SigLIP (draws from the global torch RNG; seed it around the call)."""
    return SiglipModel(siglip_config(sizes, repo=repo))


def check_siglip_sizes(config: SiglipConfig, sizes: SiglipSizes) -> list[str]:
    """Differences between a SigLIP config and the expected sizes, as readable strings.

    Covers what the weight shapes alone do not pin down (head counts, layer counts, image size,
    which only resize buffers) as well as the shapes. `text_config.projection_size` (the text
    head's output; transformers defaults it to the text hidden size, and SigLIP 2 writes it out
    equal to it) must equal the shared width: the prompter compares patches with text embeddings.
    """
    v, t = config.vision_config, config.text_config
    pairs = [
        ("vision_config.image_size", v.image_size, sizes.image_size),
        ("vision_config.patch_size", v.patch_size, sizes.patch_size),
        ("vision_config.hidden_size", v.hidden_size, sizes.hidden_size),
        ("vision_config.intermediate_size", v.intermediate_size, sizes.intermediate_size),
        ("vision_config.num_attention_heads", v.num_attention_heads, sizes.num_heads),
        ("vision_config.num_hidden_layers", v.num_hidden_layers, sizes.vision_layers),
        ("text_config.hidden_size", t.hidden_size, sizes.hidden_size),
        ("text_config.intermediate_size", t.intermediate_size, sizes.intermediate_size),
        ("text_config.num_attention_heads", t.num_attention_heads, sizes.num_heads),
        ("text_config.projection_size", t.projection_size, sizes.hidden_size),
        ("text_config.num_hidden_layers", t.num_hidden_layers, sizes.text_layers),
        ("text_config.max_position_embeddings", t.max_position_embeddings, sizes.max_text_len),
        ("text_config.vocab_size", t.vocab_size, sizes.vocab_size),
    ]
    return [f"{name}={got} (expected {want})" for name, got, want in pairs if got != want]


def _siglip_hint(config_key: str, repo: str) -> str:
    return (
        f"set {config_key} to a local directory holding {repo}, downloaded beforehand with "
        f"`hf download {repo} --local-dir <dir>` (huggingface_hub's CLI; https://huggingface.co/{repo})"
    )


def require_siglip_dir(
    path: Optional[str | os.PathLike], *, config_key: str = "model.siglip_path", repo: str = SIGLIP_REPO
) -> Path:
    """The model directory, or `ModelLoadError` if it is unset or holds no config.json."""
    hint = _siglip_hint(config_key, repo)
    if path is None or str(path) == "":
        raise ModelLoadError(f"{config_key} is not set; {hint}")
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{config_key}: directory not found: {path}; {hint}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{config_key}: {path / 'config.json'} not found; {hint}")
    return path


def check_siglip_model_type(path: Path, *, config_key: str, repo: str) -> None:
    """`ModelLoadError` unless `path`/config.json describes a plain SigLIP (`model_type: "siglip"`).

    `SiglipModel.from_pretrained` only warns on another model type and then fails on shapes (the
    NaFlex SigLIP 2 stores its patch embedding as a linear layer) with a message that names
    neither the cause nor the fix.
    """
    hint = _siglip_hint(config_key, repo)
    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{config_key}: cannot read {config_file} as a JSON object ({exc}); {hint}") from exc
    if model_type == "siglip":
        return
    if model_type == "siglip2":
        raise ModelLoadError(
            f"{config_key}: {path} holds a NaFlex SigLIP 2 model (config.json model_type 'siglip2', "
            "transformers' Siglip2Model, variable resolution), which RSRefSeg does not use; it expects "
            f"the fixed-resolution {repo} (config.json model_type 'siglip'); {hint}"
        )
    raise ModelLoadError(
        f"{config_key}: {config_file} has model_type {model_type!r}, not a SigLIP model; expected "
        f"{repo} (model_type 'siglip'); {hint}"
    )


def load_siglip(
    path: Optional[str | os.PathLike],
    sizes: SiglipSizes,
    *,
    config_key: str = "model.siglip_path",
    repo: str = SIGLIP_REPO,
) -> SiglipModel:
    """Load SigLIP from a local Hugging Face model directory; never touches the network.

    Raises `ModelLoadError` naming `config_key` and how to get `repo` when the path is unset or
    missing, the folder holds another model type (e.g. NaFlex SigLIP 2), the weights do not load,
    or the model is not the expected size. `repo` only words the messages: the SigLIP 2 release
    `SIGLIP2_REPO` is a `SiglipModel` too and loads here given its sizes.
    """
    path = require_siglip_dir(path, config_key=config_key, repo=repo)
    check_siglip_model_type(path, config_key=config_key, repo=repo)
    hint = _siglip_hint(config_key, repo)
    try:
        model, info = SiglipModel.from_pretrained(
            path, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except Exception as exc:  # missing/corrupt weight files, wrong model type, shape errors ...
        raise ModelLoadError(f"{config_key}: cannot load SigLIP from {path} ({exc}); {hint}") from exc
    # from_pretrained only warns on missing or unexpected keys and random-inits what is missing;
    # a frozen backbone with random holes would train silently wrong, so refuse it.
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind, ()))
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {', '.join(keys[:3])})")
    problems.extend(check_siglip_sizes(model.config, sizes))
    if problems:
        raise ModelLoadError(
            f"{config_key}: the SigLIP weights in {path} do not match the expected {repo} layout "
            f"({'; '.join(problems)}); {hint}"
        )
    return model


class SiglipEncoder(nn.Module):
    """SigLIP vision + text towers of one `SiglipModel`."""

    def __init__(self, *, model: SiglipModel) -> None:
        super().__init__()
        self.model = model
        vision = model.config.vision_config
        self.image_size = vision.image_size
        self.grid = (vision.image_size // vision.patch_size, vision.image_size // vision.patch_size)
        self.hidden_size = vision.hidden_size
        if model.config.text_config.projection_size != self.hidden_size:
            raise ValueError(
                "AttnPrompter compares image patches with text embeddings, so SigLIP's text "
                f"projection ({model.config.text_config.projection_size}) must equal the vision "
                f"hidden size ({self.hidden_size})"
            )

    @property
    def logit_scale(self) -> nn.Parameter:
        """SigLIP's learned log temperature [1]; the matching logit is exp(scale)*cos + bias."""
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter:
        """SigLIP's learned matching bias [1]."""
        return self.model.logit_bias

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [B,3,s,s] -> float [B,3,s,s] in [-1, 1] (SigLIP: mean = std = 0.5)."""
        x = image.float() / 127.5 - 1.0
        return x.to(self.model.logit_scale.dtype)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: normalized float [B,3,s,s] -> v: [B, h1*w1, d1] (post-layernormed patches).

        The grid is `self.grid` = (h1, w1), row-major.
        """
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids: int64 [B, L] -> (t_global [B, d1], t_local [B, L, d1]).

        No attention mask goes into the text tower: SigLIP was trained on max_length padding with
        padding attended, and its pooled token is the last position (a pad/EOS token). The prompter
        applies the mask to its own mean over tokens instead.
        """
        out = self.model.text_model(input_ids=input_ids)
        return out.pooler_output, out.last_hidden_state
