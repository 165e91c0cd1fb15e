"""Where a model checkpoint is: its two files, and the folder a `--checkpoint` names.

A model checkpoint is a folder with `weights.safetensors` (trainable weights) and `config.yaml`
(`models.checkpoint` writes and reads both). Users name one directly, by its run folder (`best/`)
or by a Ray Train checkpoint (`model/`), on this machine or in object storage. No torch here: the
CLI's light commands resolve a checkpoint before deciding to load one.
"""

from __future__ import annotations

import os
from pathlib import Path

from rsrefseg.platform import storage
from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.runs import BEST_DIR, MODEL_DIR

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.yaml"
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The model checkpoint a `--checkpoint PATH` names: a model checkpoint folder, a run folder
    (its best/) or a Ray Train checkpoint (its model/). A URI (s3://...) is looked up the same
    way and its two files are downloaded into a temporary folder of this process."""
    if storage.is_remote(path):
        return _remote_checkpoint(str(path))
    p = Path(path)
    for candidate in (p, p / BEST_DIR, p / MODEL_DIR):
        if any((candidate / f).is_file() for f in CHECKPOINT_FILES):
            return candidate
    if not p.exists():
        raise ConfigError(f"--checkpoint {p}: no such file or folder")
    raise ConfigError(
        f"--checkpoint {p}: not a checkpoint; expected {' and '.join(CHECKPOINT_FILES)} in it, "
        f"in {p / BEST_DIR} (a train run folder) or in {p / MODEL_DIR} (a Ray checkpoint)"
    )


def checkpoint_source(checkpoint: str | os.PathLike, resolved: Path) -> str:
    """How records name a checkpoint: the URI as given for one in object storage (its local copy
    is temporary), else the folder `find_checkpoint` found."""
    return str(checkpoint).rstrip("/") if storage.is_remote(checkpoint) else str(resolved)


def _remote_checkpoint(uri: str) -> Path:
    storage.require_credentials("--checkpoint", uri)
    try:
        p = storage.location(uri.rstrip("/"))
        for candidate in (p, p / BEST_DIR, p / MODEL_DIR):
            # CONFIG_FILE is written last to a store (save_best): with it, the weights are there.
            if (candidate / CONFIG_FILE).is_file():
                return storage.local_copy(candidate, CHECKPOINT_FILES)
        answer = storage.missing_bucket(p)
    except OSError as exc:
        raise storage.StorageError(f"--checkpoint {uri}: {storage.describe(exc, uri)}") from None
    if answer:
        raise storage.StorageError(f"--checkpoint: {p}: {answer}")
    raise ConfigError(f"--checkpoint {uri}: not a checkpoint; expected {CONFIG_FILE} and {WEIGHTS_FILE} in it, "
                      f"in {p / BEST_DIR} (a train run folder) or in {p / MODEL_DIR} (a Ray checkpoint)")
