"""The MLflow pyfunc model of a trained RSRefSeg checkpoint, logged as *code* (MLflow's
models-from-code), so loading it runs this file and reads the checkpoint's safetensors and YAML:
no pickled model object is ever loaded.

    model = mlflow.pyfunc.load_model("models:/<name>/<version>")
    masks = model.predict(pandas.DataFrame({"image": ["scene.tif"], "text": ["building"]}))

Input: a DataFrame (or a list of dicts) with `image` (a file path, or the bytes of an image file)
and `text` (the phrase). Output: one bool mask [H, W] per row, at its image's size (large scenes
are tiled, as `rsrefseg predict` does). The serving environment needs the rsrefseg package.
"""

from __future__ import annotations

import io

import mlflow
import numpy as np


class RSRefSegModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from rsrefseg.models.checkpoint import load_checkpoint
        from rsrefseg.inference.scoring import inference_device
        from rsrefseg.models.presets import input_sizes
        from rsrefseg.models.tokenizer import load_tokenizer

        model, cfg = load_checkpoint(context.artifacts["checkpoint"])
        self.device, self.autocast = inference_device()
        self.model = model.to(self.device).eval()
        self.sizes, self.tokenizer = input_sizes(cfg.model, cfg.data.label_size), load_tokenizer(cfg.model)

    def predict(self, context, model_input, params=None) -> list[np.ndarray]:
        from rsrefseg.inference.scenes import segment

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        return [segment(self.model, self.sizes, self.tokenizer, _rgb(row["image"]), str(row["text"]),
                        device=self.device, autocast=self.autocast) for row in rows]


def _rgb(image) -> np.ndarray:
    """A path or an image file's bytes -> RGB uint8 [H, W, 3] (GeoTIFFs through rasterio)."""
    from pathlib import Path

    from PIL import Image

    from rsrefseg.inference.scenes import read_scene

    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as im:
            return np.asarray(im.convert("RGB"))
    return read_scene(Path(str(image))).rgb


mlflow.models.set_model(RSRefSegModel())
