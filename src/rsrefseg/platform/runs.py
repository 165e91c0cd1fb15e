"""Run and sweep folders: the one owner of their layout, of resuming them, and of the checkpoint
layout inside them. Jobs and tests use this API; nothing else spells these names.

    <train.storage_path>/
      <run>/                          one `rsrefseg train` run (Ray Train's run folder)
        rsrefseg_run.json             RUN_INFO: the run's config, its MLflow run id, `finished`
        checkpoint_*/                 Ray Train's epoch checkpoints (kept: the best and the latest)
          deepspeed/state/...         DeepSpeed engine state of every rank (resume)
          model/                      a model checkpoint (weights.safetensors + config.yaml)
          state.json                  epoch, step and metric history (resume)
        best/                         the best epoch's model checkpoint, copied out when it ends
      <sweep>/                        one `rsrefseg tune` sweep (Ray Tune's experiment folder)
        rsrefseg_sweep.json           SWEEP_INFO: base config, sweep file copy, MLflow parent run
        sweep.yaml, ablation.{md,csv,png}
        trials/<trial id>/            each trial's run folder, laid out as above

The storage root may be a local folder or object storage (`s3://BUCKET/runs`): folders here are
`storage.Location`s, a Path or a RemotePath with the same few operations.

No Ray, no torch: the CLI and light commands import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rsrefseg.platform import atomic, paths, storage
from rsrefseg.platform.atomic import write_json, write_text
from rsrefseg.platform.config import Config
from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError, UserError

RUN_INFO = "rsrefseg_run.json"
SWEEP_INFO = "rsrefseg_sweep.json"
SWEEP_FILE_COPY = "sweep.yaml"
BEST_DIR = "best"
TRIALS_DIR = "trials"
LOCK_FILE = ".rsrefseg.lock"  # the process that writes a run or sweep folder (`lock`)

# Inside one reported Ray Train checkpoint.
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
MODEL_DIR = "model"
STATE_FILE = "state.json"



def storage_root(cfg: Config) -> storage.Location:
    """Where the config's runs and sweeps live (train.storage_path, against paths.root): a local
    folder or a storage.RemotePath (s3://...)."""
    return storage.location(paths.rooted(cfg.train.storage_path, paths.project_root(cfg.paths.root)))


def new_run_name(cfg: Config) -> str:
    return f"{cfg.tracking.run_name or 'train'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def new_sweep_name(cfg: Config, sweep_file: str) -> str:
    return cfg.tune.name or f"sweep-{Path(sweep_file).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def trial_name(sweep_name: str, trial_id: str) -> str:
    """A Tune trial's run folder, relative to the storage root."""
    return f"{sweep_name}/{TRIALS_DIR}/{trial_id}"


@dataclass
class SavedRun:
    """What a run folder's RUN_INFO records."""

    cfg: Config
    name: str  # relative to the config's storage root, e.g. `<sweep>/trials/<trial id>`
    mlflow_run_id: str | None
    finished: dict | None  # {"best_metrics", "history"} once the run has ended

    @property
    def run_dir(self) -> storage.Location:
        return storage_root(self.cfg) / self.name


def create_run(run_dir: storage.Location, cfg: Config, mlflow_run_id: str | None) -> None:
    """Record a (new or continued) run in its folder."""
    _write_run_info(run_dir, cfg, mlflow_run_id)


def finish_run(run_dir: storage.Location, cfg: Config, mlflow_run_id: str | None, *, best_metrics: dict,
               history: list[dict]) -> None:
    """Mark the run finished: it is never trained again (the last thing a run writes)."""
    _write_run_info(run_dir, cfg, mlflow_run_id, finished={"best_metrics": dict(best_metrics), "history": history})


def save_best(model_dir: str | os.PathLike, run_dir: storage.Location, *, last: str) -> storage.Location:
    """Copy the best epoch's model checkpoint to `<run>/best` (atomically; on an object store
    the file `last` after the others: the one a checkpoint's reader looks for there)."""
    return storage.copy_dir(model_dir, run_dir / BEST_DIR, last=last)


def _write_run_info(run_dir: storage.Location, cfg: Config, run_id: str | None, finished: dict | None = None) -> None:
    info = {"mlflow_run_id": run_id, "config": cfg.to_dict()}
    if finished is not None:
        info["finished"] = finished
    write_json(run_dir / RUN_INFO, info)


def find_run(root: storage.Location, name: str) -> SavedRun | None:
    """The run folder `name` under `root` when it exists (a Tune trial restarted by its sweep)."""
    return open_run(root, name) if (root / name / RUN_INFO).is_file() else None


def open_run(root: storage.Location, ref: str) -> SavedRun:
    """The run a `--resume REF` names: a folder path as typed, or a name under `root`."""
    run_dir = named_folder(root, ref, RUN_INFO)
    info = run_dir / RUN_INFO
    if not info.is_file():
        raise ConfigError(
            f"--resume {paths.redact(ref)}: no run folder {run_dir} (expected {info}); "
            f"runs under {root}: {', '.join(_known(root, RUN_INFO)) or 'none'}"
        )
    data = json.loads(info.read_text())
    cfg = Config.from_dict(data["config"], source=str(info))
    try:
        # The name relative to the saved storage root, nested parts kept (a Tune trial is
        # `<sweep>/trials/<id>`): Ray Train finds the run's checkpoints at storage_path/name.
        name = run_dir.resolve().relative_to(storage_root(cfg).resolve()).as_posix()
    except ValueError:  # the folder was moved: continue it where it is now
        cfg = cfg.replace({"train.storage_path": str(run_dir.resolve().parent)})  # a URI stays a URI
        name = run_dir.name
    return SavedRun(cfg=cfg, name=name, mlflow_run_id=data.get("mlflow_run_id"), finished=data.get("finished"))


def _known(root: storage.Location, marker: str) -> list[str]:
    """The run (RUN_INFO) or sweep (SWEEP_INFO) folders directly under `root`, by name."""
    return sorted(p.parent.name for p in root.glob(f"*/{marker}")) if root.is_dir() else []


def trial_runs(sweep_dir: storage.Location) -> dict[str, dict]:
    """Trial id -> what its run folder records (`mlflow_run_id`, `finished`), for the trials of a
    sweep whose training started."""
    return {info.parent.name: json.loads(info.read_text())
            for info in sorted(sweep_dir.glob(f"{TRIALS_DIR}/*/{RUN_INFO}"))}


# -- sweeps -------------------------------------------------------------------------------------


@dataclass
class SavedSweep:
    sweep_dir: storage.Location
    base: Config
    parent_run_id: str | None
    sweep_file: str  # the sweep file as given
    sweep_file_copy: storage.Location  # the copy kept in the sweep folder (what a resume reads)

    @property
    def name(self) -> str:
        return self.sweep_dir.name


def create_sweep(sweep_dir: storage.Location, base: Config, sweep_file: str, parent_run_id: str | None) -> SavedSweep:
    """Record a new sweep: its base config, a copy of its sweep file, its MLflow parent run."""
    copy = write_text(sweep_dir / SWEEP_FILE_COPY, Path(sweep_file).read_text())
    write_json(sweep_dir / SWEEP_INFO, {"base": base.to_dict(), "parent_run_id": parent_run_id,
                                        "sweep_file": sweep_file, "sweep_file_copy": str(copy)})
    return SavedSweep(sweep_dir, base, parent_run_id, sweep_file, copy)


def open_sweep(root: storage.Location, ref: str) -> SavedSweep:
    """The sweep a `tune --resume REF` names: a folder path as typed, or a name under `root`."""
    sweep_dir = named_folder(root, ref, SWEEP_INFO)
    info_path = sweep_dir / SWEEP_INFO
    if not info_path.is_file():
        raise ConfigError(f"--resume {paths.redact(ref)}: {info_path} not found; "
                          f"sweeps under {root}: {', '.join(_known(root, SWEEP_INFO)) or 'none'}")
    info = json.loads(info_path.read_text())
    copy = storage.location(info.get("sweep_file_copy") or sweep_dir / SWEEP_FILE_COPY)
    if not copy.is_file():  # the folder was moved: its copy is beside the info
        copy = sweep_dir / SWEEP_FILE_COPY
    if isinstance(copy, storage.RemotePath):  # the sweep file reader reads a local file
        copy = storage.local_copy(copy.parent, (copy.name,)) / copy.name
    return SavedSweep(sweep_dir, Config.from_dict(info["base"], source=str(info_path)), info.get("parent_run_id"),
                      info.get("sweep_file", str(copy)), copy)


# -- names as typed -----------------------------------------------------------------------------


def named_folder(root: storage.Location, ref: str, marker: str) -> storage.Location:
    """The folder a `--resume REF` names: a URI (s3://...), a path as typed (absolute, or
    relative to here or to the project folder, as in `runs/<name>`) when it holds `marker`, else
    the name REF under the storage root `root`. (A submitted job runs in Ray's copy of the code,
    not the project folder.)"""
    if storage.is_remote(ref):
        return storage.location(ref.rstrip("/"))
    for path in (Path(ref), paths.project_root() / ref):
        if (path / marker).is_file():
            return path.resolve()
    return root / ref


# -- one writer per folder ----------------------------------------------------------------------


class FolderInUse(UserError):
    """Another process writes the run or sweep folder (a second `--resume` of it, or a sweep of
    the same name)."""


@contextlib.contextmanager
def lock(folder: storage.Location, what: str) -> Iterator[None]:
    """Hold `folder` (a run's or a sweep's; `what` says which, e.g. "run NAME") for the block, so
    that one process at a time writes it.

    The lock is the file LOCK_FILE in the folder, holding the holder's host, pid and start time.
    While the holder lives, a second process is refused with a FolderInUse naming the folder and
    the holder; a lock whose holder is gone (its pid no longer runs on this host: a killed job) is
    taken over. A holder on another host cannot be checked from here: the message names the file
    to delete once that process is known to be gone.

    A local folder's lock file is created with O_EXCL, which the filesystem makes atomic. An
    object store (a RemotePath) has no atomic create-if-absent through pyarrow, so there the lock
    is best-effort: the lock object is written, read back and compared, which catches a second
    writer unless both write within the same instant.
    """
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = folder / LOCK_FILE
    if isinstance(folder, storage.RemotePath):
        created = _acquire_remote(folder, path, mine, what)
    else:
        created = _acquire_local(folder, path, mine, what)
    try:
        yield
    finally:
        _release(path, mine, folder if created else None)


def _acquire_local(folder: Path, path: Path, mine: dict, what: str) -> bool:
    """Create the lock file (O_EXCL), taking over a dead holder's; whether the folder was new."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # again after taking over a dead holder's lock
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            _take_over_or_refuse(folder, path, what)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine))
        return created
    raise FolderInUse(_in_use(folder, path, what, _holder(path)))


def _acquire_remote(folder: storage.RemotePath, path: storage.RemotePath, mine: dict, what: str) -> bool:
    """Write the lock object, read it back and compare (best-effort: see `lock`)."""
    if path.is_file():
        _take_over_or_refuse(folder, path, what)
    path.write_text(json.dumps(mine))
    holder = _holder(path)
    if holder != mine:
        raise FolderInUse(_in_use(folder, path, what, holder))
    return False


def _holder(path: storage.Location) -> dict | None:
    """Who holds a lock (host, pid, since), or None when its file cannot be read as one."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and {"host", "pid"} <= holder.keys() else None


def _gone(holder: dict) -> bool:
    """Whether a lock's holder has ended: only a process of this host can be checked."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        return not atomic.process_running(int(holder["pid"]))
    except ValueError:  # not a pid
        return False


def _take_over_or_refuse(folder: storage.Location, path: storage.Location, what: str) -> None:
    """Remove a lock whose holder is gone; refuse (FolderInUse) one whose holder may still run."""
    holder = _holder(path)
    if holder is None or not _gone(holder):
        raise FolderInUse(_in_use(folder, path, what, holder))
    say(f"{what}: taking over the lock of process {holder['pid']} on {holder['host']}, which has ended")
    if _holder(path) == holder:  # not one that another process took over meanwhile
        path.unlink(missing_ok=True)


def _in_use(folder: storage.Location, path: storage.Location, what: str, holder: dict | None) -> str:
    if holder is None:
        return (f"{what}: {folder} is in use: its lock {path} names no holder (being written, or left "
                "unfinished); delete it if no other rsrefseg job writes that folder")
    return (f"{what}: {folder} is in use by process {holder['pid']} on host {holder['host']} (since "
            f"{holder.get('since', '?')}): wait for that job to end, or stop it. If it is gone, delete {path}")


def _release(path: storage.Location, mine: dict, new_folder: Path | None) -> None:
    """Remove our lock (never another's), and a folder the block created and left empty."""
    try:
        if _holder(path) == mine:
            path.unlink(missing_ok=True)
        if new_folder is not None and not any(new_folder.iterdir()):
            new_folder.rmdir()
    except OSError:
        pass  # a lock left behind is taken over by the next job of this host
