"""Model checkpoints: a folder with `weights.safetensors` (trainable weights only) and
`config.yaml` (the Config, variant keys resolved, paths relative to the project folder: no path of
the machine that trained it). The frozen backbones are rebuilt from the config (pretrained files
resolved against the loading machine's project folder, or `model.init_seed` for `tiny`), which
keeps checkpoints small. No pickle anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rsrefseg.models.build import build_model
from rsrefseg.models.trainable import TrainableWeights
from rsrefseg.platform.atomic import atomic_dir
from rsrefseg.platform.config import Config, read_yaml
from rsrefseg.models.checkpoint_folder import CONFIG_FILE, WEIGHTS_FILE  # noqa: F401 (the folder's names)
from rsrefseg.platform import paths
from rsrefseg.platform.errors import ConfigError, UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model its config describes."""


def save_checkpoint(model: TrainableWeights, config: Config, directory: str | os.PathLike) -> Path:
    """Write the checkpoint folder atomically: fill a temporary sibling folder, then rename it.

    An existing checkpoint at `directory` is replaced; readers never see a half-written one.
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        # safetensors refuses shared or non-contiguous storage; trainable tensors are plain, but
        # clone on CPU anyway so GPU/ZeRO-owned memory is never aliased.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.trainable_state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "preset": config.model.preset,
                                                                 "arch": config.model.arch})
        paths.portable(config).dump(tmp / CONFIG_FILE)
    return directory


def load_config_file(directory: str | os.PathLike) -> Config:
    """The Config saved in a checkpoint folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {Path(directory)} a checkpoint folder?)")
    try:
        return Config.from_dict(read_yaml(path), source=str(path))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: not a valid config ({exc})") from exc


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[TrainableWeights, Config]:
    """Rebuild the model from the checkpoint's config and load its trainable weights.

    The model's pretrained files resolve against the project folder here (paths.root, else
    $RSREFSEG_HOME, else the working directory); the config comes back as saved, so a caller's
    paths.root still applies to its relative paths. Raises `CheckpointError` naming the file when
    it is missing, corrupt, or holds weights of a different model shape.
    """
    directory = Path(directory)
    config = load_config_file(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found (is {directory} a checkpoint folder?)")
    try:
        state = load_file(str(weights), device="cpu")
        # Checkpoints written before model.arch existed hold RSRefSeg's weights.
        with safe_open(str(weights), "pt") as handle:
            saved_arch = (handle.metadata() or {}).get("arch", "rsrefseg")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    if saved_arch != config.model.arch:
        raise CheckpointError(
            f"{weights}: holds weights of model.arch={saved_arch}, but {directory / CONFIG_FILE} says "
            f"model.arch={config.model.arch}; a checkpoint loads only into the architecture that trained it"
        )
    model = build_model(paths.absolute(config).model, config.data.label_size)
    try:
        model.load_trainable_state_dict(state)
    except ValueError as exc:
        raise CheckpointError(
            f"{weights}: does not match the model described by {directory / CONFIG_FILE} "
            f"(preset {config.model.preset}): {exc}"
        ) from exc
    return model.to(map_location), config
