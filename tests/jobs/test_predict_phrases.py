"""`rsrefseg predict` with several phrases reads a scene and encodes each of its tiles once for
all of them, and still writes, for each phrase, the mask a call with that phrase alone writes
(and the mask the model's plain forward, one phrase at a time, gave before), bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.jobs.test_predict_scenes import _geotiff

PHRASES = ["road", "white car", "building near the lake"]
HEIGHT, WIDTH, TILE = 600, 700, 256  # 3 x 4 tiles: a batch of 8 and one of 4


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    from rsrefseg.models.build import build_model
    from rsrefseg.models.checkpoint import save_checkpoint
    from rsrefseg.platform.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs/demo.yaml"), ["model.arch=rsrefseg2"])
    out = tmp_path_factory.mktemp("ckpt2") / "best"
    save_checkpoint(build_model(cfg.model, cfg.data.label_size), cfg, out)
    return {"rsrefseg": tiny_checkpoint, "rsrefseg2": out}


class _Counts:
    """Calls of SceneFile.read and of each model class's encode_images / encode_text."""

    def __init__(self, monkeypatch):
        from rsrefseg.inference.scenes import SceneFile
        from rsrefseg.models.rsrefseg import RSRefSeg
        from rsrefseg.models.rsrefseg2 import RSRefSeg2

        self.calls = {"read": 0, "encode_images": 0, "encode_text": 0}
        self._wrap(monkeypatch, SceneFile, "read", "read")
        for cls in (RSRefSeg, RSRefSeg2):
            self._wrap(monkeypatch, cls, "encode_images", "encode_images")
            self._wrap(monkeypatch, cls, "encode_text", "encode_text")

    def _wrap(self, monkeypatch, cls, method: str, key: str) -> None:
        original = getattr(cls, method)

        def counted(*args, **kwargs):
            self.calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, method, counted)

    def during(self, fn) -> dict[str, int]:
        before = dict(self.calls)
        fn()
        return {k: self.calls[k] - before[k] for k in self.calls}


def _read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(1)


def _forward_masks(checkpoint: Path, scene: Path) -> dict[str, np.ndarray]:
    """Each phrase's mask as predict made it before the split: the model's forward on each batch
    of tiles with the phrase repeated, one phrase at a time, the scene read once per phrase."""
    import torch
    import torch.nn.functional as F

    from rsrefseg.datasets.pipeline import tokenize
    from rsrefseg.inference.scenes import open_scene
    from rsrefseg.inference.scoring import predict_logits
    from rsrefseg.inference.tiling import _model_images, predict_tiles
    from rsrefseg.models.checkpoint import load_checkpoint
    from rsrefseg.models.device_inputs import crop_valid
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.tokenizer import load_tokenizer

    model, cfg = load_checkpoint(checkpoint)
    model.eval()
    sizes, tokenizer = input_sizes(cfg.model, cfg.data.label_size), load_tokenizer(cfg.model)
    masks = {}
    for phrase in PHRASES:
        ids, attention = tokenize(tokenizer, [phrase], sizes.max_text_len)

        def predict(batch_tiles):
            n, h, w = batch_tiles.shape[:3]
            sam_image, siglip_image, valid = _model_images(batch_tiles, sizes)
            batch = {"sam_image": sam_image, "siglip_image": siglip_image,
                     "input_ids": torch.from_numpy(ids).repeat(n, 1),
                     "attention_mask": torch.from_numpy(attention).repeat(n, 1)}
            logits = crop_valid(predict_logits(model, batch, torch.device("cpu")), valid)
            return torch.cat([F.interpolate(x[None, None], size=(h, w), mode="bilinear", align_corners=False)[0]
                              for x in logits]).numpy()

        with open_scene(scene) as reader:
            masks[phrase] = predict_tiles(reader.read, HEIGHT, WIDTH, predict, tile=TILE, overlap=0.25)
    return masks


@pytest.mark.parametrize("arch", ["rsrefseg", "rsrefseg2"])
def test_several_phrases_share_the_reads_and_encodings_and_give_each_phrase_its_own_mask(
        arch, checkpoints, tmp_path, monkeypatch):
    from rsrefseg.jobs.predict import run_predict

    scene = tmp_path / "scene.tif"
    _geotiff(scene, HEIGHT, WIDTH, dtype=np.uint16)
    counts = _Counts(monkeypatch)
    common = dict(image=str(scene), tile=TILE, cpu=True)
    together = {}
    several = counts.during(lambda: together.update(
        run_predict(str(checkpoints[arch]), text=PHRASES, out=str(tmp_path / "masks"), **common)))
    forward = _forward_masks(checkpoints[arch], scene)
    for phrase in PHRASES:
        alone = tmp_path / f"alone-{len(phrase)}.tif"
        one = counts.during(lambda: run_predict(str(checkpoints[arch]), text=phrase, out=str(alone), **common))
        mask = _read(together[(str(scene), phrase)])
        np.testing.assert_array_equal(mask, _read(alone))
        np.testing.assert_array_equal(mask > 0, forward[phrase])
        # Reads and image encodings: as many for the three phrases as for one; the text tower once
        # per phrase and batch size (a batch of 8 tiles and one of 4), not once per batch.
        assert (one["read"], one["encode_images"], one["encode_text"]) == (12, 2, 2)
        assert (several["read"], several["encode_images"], several["encode_text"]) == (12, 2, 6)
    masks = [_read(together[(str(scene), phrase)]) for phrase in PHRASES]
    assert not np.array_equal(masks[0], masks[1]) and 0 < (masks[0] > 0).mean() < 1
