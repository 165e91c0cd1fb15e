"""Where a config's relative paths point: one root, decided once by the driver.

Recipes name files relative to the project (`data/rrsisd/prepared`, `weights/sam_vit_b_01ec64.pth`,
`runs`, `sqlite:///mlflow.db`). They resolve against `paths.root`; empty means the project folder:
`$RSREFSEG_HOME` when set, else the working directory. The driver makes every path absolute
before anything runs, so Ray workers and Tune trials (other processes, other machines, other
working directories) never resolve a path on their own.

A submitted Ray job runs in Ray's copy of the job's working_dir, which holds the code and the
recipes but not data/, weights/ or runs/ (they are excluded from the upload). On a cluster the
root is where the nodes keep those: cluster.yaml syncs them to /home/ray/rsrefseg and starts Ray
with RSREFSEG_HOME set to it; `rsrefseg submit --root DIR` or `paths.root=DIR` say it per job.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from rsrefseg.platform.config import Config, TrackingConfig
from rsrefseg.platform.errors import ConfigError

HOME_ENV = "RSREFSEG_HOME"
# The config keys that name local files or folders (URIs such as s3://... pass through).
PATH_KEYS = ("data.path", "model.siglip_path", "model.sam_checkpoint", "train.storage_path")


def path_keys(cfg: Config) -> tuple[str, ...]:
    """PATH_KEYS plus the path of each of data.sources (data.sources.<name>.path)."""
    return PATH_KEYS + tuple(f"data.sources.{name}.path" for name in cfg.data.sources)

# What each key must hold and where users get it, for the missing-path message.
EXPECTED = {
    "data.path": "a folder written by `rsrefseg prepare`",
    "model.sam_checkpoint": "the preset's official segment-anything checkpoint "
                            "(https://github.com/facebookresearch/segment-anything#model-checkpoints)",
    "model.siglip_path": "a local copy of google/siglip-so400m-patch14-384 "
                         "(`hf download google/siglip-so400m-patch14-384 --local-dir <dir>`)",
}


class MissingPath(ConfigError):
    """A path the job needs does not exist on the machine that resolved it."""


def project_root(root: str = "") -> Path:
    """The folder relative paths resolve against: `root` (paths.root), else $RSREFSEG_HOME,
    else the working directory."""
    return Path(root or os.environ.get(HOME_ENV) or os.getcwd()).expanduser().resolve()


def is_uri(value: str) -> bool:
    """A URI (s3://..., sqlite:///..., http://...), not a path: the one test of it."""
    return "://" in str(value)


def redact(value: object) -> str:
    """A URI as a message may show it: a `user:password@` in it shown as `***@`, and the value
    of every `?key=value` option as `***` (the keys stay, so the message can say what to move out
    of the URI). Anything that is not a URI comes back as given. Every message that shows a URI
    a user typed goes through here: a refused `s3://KEY:SECRET@bucket` must not echo the secret."""
    text = str(value)
    if not is_uri(text):
        return text
    scheme, rest = text.split("://", 1)
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    if question:
        query = "&".join(f"{item.partition('=')[0]}=***" if "=" in item else item for item in query.split("&"))
    return f"{scheme}://{netloc}{slash}{path}{question}{query}{hash_}{'***' if fragment else ''}"


SQLITE = "sqlite:///"


def sqlite_file(uri: str) -> str | None:
    """The database file a `sqlite:///FILE` URI names (relative or absolute), else None."""
    return uri[len(SQLITE):] if uri.startswith(SQLITE) else None


def rooted(value: str, root: Path) -> str:
    """`value` made absolute against `root`; empty values, absolute paths and URIs unchanged."""
    if not value or is_uri(value) or os.path.isabs(value):
        return value
    return str(root / value)


def relative(value: str, root: Path) -> str:
    """The inverse of `rooted`: an absolute path under `root` made relative to it; anything else
    unchanged."""
    if not value or is_uri(value) or not os.path.isabs(value):
        return value
    try:
        return Path(value).relative_to(root).as_posix()
    except ValueError:
        return value


def absolute(cfg: Config) -> Config:
    """The config with every path key absolute, and paths.root itself absolute (so a process
    that resolves the same config again, such as a Tune trial, gets the same answer)."""
    root = project_root(cfg.paths.root)
    flat = cfg.flat()
    updates = {key: rooted(flat[key], root) for key in path_keys(cfg) if flat[key]}
    updates["paths.root"] = str(root)
    return cfg.replace(updates)


def require(cfg: Config, keys: tuple[str, ...] | list[str]) -> None:
    """Fail, naming the key, the absolute path tried and this host, when a local path is missing.

    Unset keys are left to the job's own checks (which say what the key must hold)."""
    flat = cfg.flat()
    root = project_root(cfg.paths.root)
    for key in keys:
        value = flat[key]
        if not value or is_uri(value):
            continue
        path = Path(rooted(value, root))
        if not path.exists():
            what = "data.path" if key.startswith("data.sources.") else key
            expected = f" (expected: {EXPECTED[what]})" if what in EXPECTED else ""
            raise MissingPath(
                f"{key}: {path} does not exist on host {socket.gethostname()}{expected}. Relative paths in a "
                f"config resolve against paths.root, here {root} (paths.root empty: ${HOME_ENV}, else "
                "the working directory); on a cluster set it to where the nodes hold the project's "
                "data and weights (rsrefseg submit --root DIR, or paths.root=DIR)"
            )


# -- the MLflow store of a config, and the config as it travels ---------------------------------


def tracking_uri(tracking: TrackingConfig, root: Path | None = None) -> str:
    """The configured URI, or the project-local SQLite store, as an absolute URI.

    Absolute, because Ray workers run in other working directories; a relative SQLite file
    resolves against `root` (the config's paths.root; default: the project folder)."""
    root = root or project_root()
    if not tracking.uri:
        return SQLITE + str(root / "mlflow.db")
    db = sqlite_file(tracking.uri)
    if db is not None and not os.path.isabs(db):
        return SQLITE + str((root / db).resolve())
    return tracking.uri


def artifact_location(tracking: TrackingConfig, root: Path | None = None) -> str | None:
    """Artifact root for new experiments; only set for a local SQLite store (a server has its
    own): `mlartifacts/` beside the database file, so a store and its artifacts stay together
    (the default store: <project>/mlflow.db and <project>/mlartifacts)."""
    root = root or project_root()
    if tracking.artifact_location:
        loc = tracking.artifact_location
        return loc if is_uri(loc) else (root / loc).resolve().as_uri()
    db = sqlite_file(tracking_uri(tracking, root))
    return (Path(db).parent / "mlartifacts").as_uri() if db is not None else None


def with_tracking_store(cfg: Config) -> Config:
    """The config with its MLflow store and artifact root made absolute (against paths.root)."""
    root = project_root(cfg.paths.root)
    return cfg.replace({"tracking.uri": tracking_uri(cfg.tracking, root),
                        "tracking.artifact_location": artifact_location(cfg.tracking, root) or ""})


def localize(cfg: Config) -> Config:
    """Every path and the tracking store made absolute on this machine, against paths.root
    (Ray workers and Tune trials run in other working directories, or on other machines)."""
    return with_tracking_store(absolute(cfg))


def portable(cfg: Config) -> Config:
    """The inverse of `localize`, for what is kept with a checkpoint or recorded in MLflow: paths
    under paths.root relative to it again, paths.root and the default MLflow store left empty.
    The record then names no folder of the machine that wrote it; whoever loads it resolves the
    paths against their own project folder. (A path given outside the project stays as given.)"""
    root = project_root(cfg.paths.root)
    flat = cfg.flat()
    updates: dict = {key: relative(flat[key], root) for key in path_keys(cfg) if flat[key]}
    updates["paths.root"] = ""
    uri = flat["tracking.uri"]
    db = sqlite_file(uri)
    if uri == tracking_uri(TrackingConfig(), root):  # the default store
        uri = ""
    elif db is not None:
        uri = SQLITE + relative(db, root)
    updates["tracking.uri"] = uri
    artifacts = flat["tracking.artifact_location"]
    default_artifacts = artifact_location(TrackingConfig(uri=uri), root)
    updates["tracking.artifact_location"] = "" if artifacts == default_artifacts else artifacts
    return cfg.replace(updates)
