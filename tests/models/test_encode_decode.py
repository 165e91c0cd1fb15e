"""Both architectures split their forward into the image half (`encode_images`, once per image)
and the phrase half (`encode_text`, then `decode`), so that `rsrefseg predict` can encode a tile
once for several phrases: the composition is the forward, bit for bit."""

from __future__ import annotations

import pytest
import torch

from rsrefseg.models.build import build_model
from rsrefseg.platform.config import Config
from tests.models.helpers import make_batch
from tests.models.test_rsrefseg2 import batch2


@pytest.mark.parametrize("arch", ["rsrefseg", "rsrefseg2"])
def test_decoding_the_encoded_images_and_phrase_is_the_forward(arch):
    torch.manual_seed(0)
    model = build_model(Config().replace([f"model.arch={arch}", "model.preset=tiny"]).model).eval()
    batch = (make_batch if arch == "rsrefseg" else batch2)(3, seed=4)
    with torch.no_grad():
        whole = model(batch["sam_image"], batch["siglip_image"], batch["input_ids"], batch["attention_mask"])
        images = model.encode_images(batch["sam_image"], batch["siglip_image"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        split = model.decode(images, text)
        # The same image features serve a second phrase: decoding it is that phrase's forward.
        other_ids, other_mask = batch["input_ids"].roll(1, 0), batch["attention_mask"].roll(1, 0)
        other = model(batch["sam_image"], batch["siglip_image"], other_ids, other_mask)
        reused = model.decode(images, model.encode_text(other_ids, other_mask))
    assert torch.equal(split, whole)
    assert torch.equal(reused, other)
    assert not torch.equal(other, whole)  # a different phrase, different logits
