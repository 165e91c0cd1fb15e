"""The MLflow pyfunc model of a trained RSRefSeg checkpoint, logged as *code* (MLflow's
models-from-code), so loading it runs this file and reads the checkpoint's safetensors and YAML:
no pickled model object is ever loaded.

    model = mlflow.pyfunc.load_model("models:/<name>/<version>")
    masks = model.predict(pandas.DataFrame({"image": [Path("scene.tif").read_bytes()], "text": ["building"]}))

Input (the model's signature, `inference.signature.model_signature()`): rows of `image` and `text` (the phrase).
`image` is the bytes of an image file (PNG, JPEG or TIFF/GeoTIFF; base64 in a JSON request to
`mlflow models serve`, which decodes it by the signature's binary type) or, from Python, an RGB
uint8 array [H, W, 3]. The model never opens a path: whoever calls a served model must not be
able to make it read files on the machine it runs on, so a string is refused. Output: one bool
mask [H, W] per row, at its image's size (large scenes are tiled, as `rsrefseg predict` does).
An image of more than MAX_PIXELS pixels is refused before it is decoded. The serving environment
needs the rsrefseg package.
"""

from __future__ import annotations

import io

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from rsrefseg.inference.signature import IMAGE, TEXT

MAX_PIXELS = 100_000_000  # px: an image above this is refused, by its header, before decoding
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
PILLOW_FORMATS = ["PNG", "JPEG"]  # decoded by Pillow; TIFFs go through rasterio, as `rsrefseg predict` reads them
ACCEPTED = "the bytes of a PNG, JPEG or TIFF file, or an RGB uint8 array [H, W, 3]"


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
        images = [_rgb(row[IMAGE], i) for i, row in enumerate(rows)]  # every row checked before any runs
        return [segment(self.model, self.sizes, self.tokenizer, rgb, str(row[TEXT]),
                        device=self.device, autocast=self.autocast) for rgb, row in zip(images, rows)]


def _refuse(row: int, why: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"row {row}: image: {why}; send {ACCEPTED}")


def _rgb(image, row: int = 0) -> np.ndarray:
    """An image file's bytes or an RGB array -> RGB uint8 [H, W, 3]. Never a path."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), row)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise _refuse(row, f"an array of {image.dtype} {list(image.shape)} is not RGB uint8 [H, W, 3]")
        _check_pixels(image.shape[0] * image.shape[1], row)
        return np.ascontiguousarray(image)
    if isinstance(image, str) or hasattr(image, "__fspath__"):
        raise _refuse(row, "a file path or other string is not accepted (the model reads no files on the "
                           "machine that serves it)")
    raise _refuse(row, f"a {type(image).__name__} is not accepted")


def _check_pixels(pixels: int, row: int) -> None:
    if pixels > MAX_PIXELS:
        raise _refuse(row, f"{pixels:,} pixels, over the model's cap of {MAX_PIXELS:,} (refused before decoding)")


def _decode(data: bytes, row: int) -> np.ndarray:
    if data[:4] in TIFF_MAGIC:
        return _decode_tiff(data, row)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as im:
            _check_pixels(im.width * im.height, row)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise _refuse(row, f"not a readable PNG, JPEG or TIFF file ({exc})") from None


def _decode_tiff(data: bytes, row: int) -> np.ndarray:
    """A TIFF (a GeoTIFF: bands, 16-bit stretch) as `rsrefseg predict` reads one: from a private
    copy in a folder of its own, which holds no sidecar file for GDAL to find."""
    import tempfile
    from pathlib import Path

    from rsrefseg.inference.scenes import open_scene
    from rsrefseg.platform.errors import ConfigError

    with tempfile.TemporaryDirectory(prefix="rsrefseg-image-") as folder:
        path = Path(folder) / "image.tif"
        path.write_bytes(data)
        try:
            with open_scene(path) as scene:
                _check_pixels(scene.height * scene.width, row)
                return scene.read(0, 0, scene.height, scene.width)
        except ConfigError as exc:
            raise _refuse(row, f"not a readable TIFF file ({str(exc).split(': ', 1)[-1]})") from None


# Loaded as code by MLflow (under a module name of its own), this file sets the model; imported
# as a module of the package (by the tests), it sets nothing.
if __name__ != "rsrefseg.serving.mlflow_model":
    mlflow.models.set_model(RSRefSegModel())
