"""rsrefseg-b at its real sizes through `rsrefseg evaluate`, from weights in the official formats.

The test writes them itself (random values): segment-anything's ViT-B state dict saved as
sam_vit_b_01ec64.pth, and a so400m-sized SigLIP directory written by `save_pretrained` with a
sentencepiece tokenizer. Forward only, batch 1, two samples, on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.models.helpers import siglip_tokenizer_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def official_weights(tmp_path_factory) -> tuple[Path, Path]:
    from segment_anything import sam_model_registry

    from transformers import SiglipModel

    from rsrefseg.models.presets import SIGLIP_SO400M_384
    from rsrefseg.models.siglip import siglip_config

    home = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    sam = home / "sam_vit_b_01ec64.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), sam)
    siglip = siglip_tokenizer_dir(home)
    # so400m with random weights in seconds: built on the meta device, where its initializers
    # (half a minute of CPU at this size) do nothing, then filled from N(0, 0.02).
    with torch.device("meta"):
        model = SiglipModel(siglip_config(SIGLIP_SO400M_384))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(siglip)
    return sam, siglip


def test_rsrefseg_b_evaluates_two_samples_on_cpu(ray_session, official_weights, prepared_dataset, tmp_path):
    from rsrefseg.jobs.evaluate import run_evaluate
    from rsrefseg.models.checkpoint import save_checkpoint
    from rsrefseg.models.build import build_model
    from rsrefseg.platform.config import load_config

    sam, siglip = official_weights
    cfg = load_config(str(REPO / "configs/rsrefseg-b-refsegrs.yaml"), [
        f"model.sam_checkpoint={sam}", f"model.siglip_path={siglip}", f"data.path={prepared_dataset}", "data.limit=2",
        "data.label_size=256",  # the loss's resolution; scoring must still happen at 512 px
    ])
    model = build_model(cfg.model, cfg.data.label_size)
    save_checkpoint(model, cfg, tmp_path / "best")
    del model
    out = tmp_path / "r.json"
    result = run_evaluate(str(tmp_path / "best"), split="test", out=str(out), batch_size=1,
                          overrides=["tracking.enabled=false"], gallery=0)
    assert result["metrics"]["count"] == 2
    assert json.loads(out.read_text())["metrics"] == result["metrics"]
    # scored at the images' own size (512 px synthetic scenes), not the label size (256)
    import pyarrow.parquet as pq

    assert pq.read_table(result["samples"]).column("pixels").to_pylist() == [512 * 512] * 2
