"""rsrefseg: a Ray-distributed experiment platform for referring remote-sensing image segmentation.

The package's top level is its public API, stable across versions (docs/api.md):

    import rsrefseg
    cfg = rsrefseg.load_config("demo")                      # a shipped recipe, or a YAML path
    model = rsrefseg.build_model(cfg)
    model, cfg = rsrefseg.load_checkpoint("runs/<run>")     # a run folder, its best/, a Ray checkpoint
    masks = rsrefseg.predict(model, cfg, [rgb], "the red car")

Each function imports what it needs when called, so `import rsrefseg` (and the CLI) stays light.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence, Union

if TYPE_CHECKING:
    import numpy as np
    import torch

    from rsrefseg.models.trainable import TrainableWeights
    from rsrefseg.platform.config import Config

__version__ = "0.1.0"
__all__ = ["load_config", "build_model", "load_tokenizer", "load_checkpoint", "save_checkpoint", "predict"]


def load_config(recipe: Union[str, os.PathLike, None] = None, overrides: Sequence[str] = ()) -> "Config":
    """A validated config: a recipe (a shipped name such as "demo" or "rsrefseg-b-rrsisd", or a
    YAML file; None: the defaults) with dotted `key=value` overrides, as on the command line."""
    from rsrefseg.platform.config import load_config as load
    from rsrefseg.platform.recipes import find_recipe

    path = find_recipe(str(recipe)) if recipe is not None else None
    return load(path, list(overrides))


def build_model(cfg: "Config", *, gpu: bool = False) -> "TrainableWeights":
    """The model `cfg` describes, its frozen backbones loaded from the local weight files the
    config names (relative paths against paths.root; `tiny` needs none). `gpu`: where it will run,
    which decides the `auto` speed switches."""
    from rsrefseg.models.build import build_model as build
    from rsrefseg.platform import paths

    return build(paths.absolute(cfg).model, cfg.data.label_size, gpu=gpu)


def load_tokenizer(cfg: "Config"):
    """The phrase tokenizer of the config's model (a `transformers` tokenizer)."""
    from rsrefseg.models.tokenizer import load_tokenizer as load
    from rsrefseg.platform import paths

    return load(paths.absolute(cfg).model)


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, "torch.device"] = "cpu"):
    """(model, config) of a checkpoint: a checkpoint folder, a run folder (its best/) or a Ray
    Train checkpoint (its model/), local or s3://. Read as safetensors and YAML, never unpickled."""
    from rsrefseg.models.checkpoint import load_checkpoint as load
    from rsrefseg.models.checkpoint_folder import find_checkpoint

    return load(find_checkpoint(path), map_location=map_location)


def save_checkpoint(model: "TrainableWeights", cfg: "Config", directory: Union[str, os.PathLike]):
    """Write `model`'s trainable weights and `cfg` as a checkpoint folder (write, then rename)."""
    from rsrefseg.models.checkpoint import save_checkpoint as save

    return save(model, cfg, directory)


def predict(model: "TrainableWeights", cfg: "Config", images: Sequence["np.ndarray"], texts: Union[str, Sequence[str]],
            *, tile: int = 0, overlap: float = 0.25, device: Union[str, "torch.device", None] = None) -> list:
    """One bool mask [H, W] per image for its phrase (`texts`: one for all images, or one each),
    through the same path as `rsrefseg predict`: whole images up to 2048 px a side, larger ones
    tiled (`tile` px; 0 = automatic). `device`: default the GPU when there is one."""
    import torch

    from rsrefseg.inference.scenes import segment
    from rsrefseg.inference.scoring import inference_device
    from rsrefseg.models.presets import input_sizes

    texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
    if len(texts) != len(images):
        raise ValueError(f"predict: {len(images)} images but {len(texts)} phrases")
    chosen, autocast = inference_device()
    device = torch.device(device) if device is not None else chosen
    if device.type != "cuda":
        autocast = None
    model = model.to(device).eval()
    sizes, tokenizer = input_sizes(cfg.model, cfg.data.label_size), load_tokenizer(cfg)
    return [segment(model, sizes, tokenizer, image, text, tile=tile, overlap=overlap, device=device, autocast=autocast)
            for image, text in zip(images, texts)]
