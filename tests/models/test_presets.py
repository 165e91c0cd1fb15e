"""Preset sizes: the contract with the data pipeline."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rsrefseg.models.presets import get_preset, input_sizes
from rsrefseg.models.sizes import InputSizes
from rsrefseg.platform.config import Config


@pytest.mark.parametrize(
    "preset, override, expected",
    [
        ("tiny", 0, InputSizes(sam_image=64, siglip_image=64, label=64, max_text_len=16)),
        ("tiny", 32, InputSizes(sam_image=64, siglip_image=64, label=32, max_text_len=16)),
        ("rsrefseg-b", 0, InputSizes(sam_image=1024, siglip_image=384, label=512, max_text_len=64)),
        ("rsrefseg-l", 256, InputSizes(sam_image=1024, siglip_image=384, label=256, max_text_len=64)),
    ],
)
def test_input_sizes(preset, override, expected):
    cfg = Config().replace([f"model.preset={preset}"]).model
    assert input_sizes(cfg, override) == expected


@pytest.mark.parametrize(
    "preset, embed_dim, depth, global_attn",
    [("rsrefseg-b", 768, 12, (2, 5, 8, 11)), ("rsrefseg-l", 1024, 24, (5, 11, 17, 23))],
)
def test_real_presets_follow_the_paper(preset, embed_dim, depth, global_attn):
    p = get_preset(preset)
    assert (p.sam.embed_dim, p.sam.depth, p.sam.global_attn_indexes) == (embed_dim, depth, global_attn)
    assert (p.siglip.hidden_size, p.siglip.vision_layers, p.siglip.text_layers, p.siglip.num_heads) == (1152, 27, 27, 16)
    assert (p.siglip.intermediate_size, p.siglip.patch_size, p.siglip.vocab_size) == (4304, 14, 32000)
    assert p.siglip.grid == 27 and p.sam.embedding_size == 64 and p.sam.low_res_size == 256


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("huge")


def test_sizes_and_file_checks_leave_the_model_libraries_unimported():
    # Every job's driver and the data pipeline read sizes and check files: importing
    # segment-anything (torchvision, dynamo) and transformers there costs seconds per process.
    code = ("import sys; import rsrefseg.jobs.train; from rsrefseg.models import presets; "
            "from rsrefseg.platform.config import Config; model = Config().model; "
            "presets.input_sizes(model); presets.check_model_files(model); "
            "print(sorted(m for m in ('segment_anything', 'torchvision', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
