"""Official weight files read safely: the path checked before anything large is built, and the
file loaded with `weights_only` (an official checkpoint is tensors; never unpickle code). SAM's
`.pth` and SAM 2.1's `.pt` both go through here, so both fail the same clear way."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from rsrefseg.models.errors import ModelLoadError


def require_file(path: Optional[str | os.PathLike], *, config_key: str, hint: str) -> Path:
    """The path, or `ModelLoadError` naming `config_key` if it is unset or not a file."""
    if path is None or str(path) == "":
        raise ModelLoadError(f"{config_key} is not set; {hint}")
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{config_key}: file not found: {path}; {hint}")
    return path


def load_tensors(path: Path, *, config_key: str, hint: str, what: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, its failures as `ModelLoadError`s naming
    the key, the file and `what` it should be."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{config_key}: {path} holds pickled Python objects, not just tensors; refusing to "
            f"unpickle it (weights_only). {hint}"
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file, ...
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{config_key}: cannot read {path} as {what} ({first_line}); {hint}") from exc
