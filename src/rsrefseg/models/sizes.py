"""Input sizes shared by the data pipeline and the model (the contract between the two)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputSizes:
    """Square sizes, in pixels, of what one sample becomes before it reaches the model.

    sam_image:    SAM image-encoder input (1024 for the paper's ViT-B/L).
    siglip_image: SigLIP vision input (384 for so400m-patch14-384).
    label:        mask resolution at which loss and metrics are computed.
    max_text_len: phrase tokens, padded/truncated to this length (SigLIP uses 64).
    """

    sam_image: int
    siglip_image: int
    label: int
    max_text_len: int
