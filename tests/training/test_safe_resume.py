"""A resumed or restarted train worker loads its DeepSpeed state with torch's weights-only
unpickler: the optimizer and step state come back; a checkpoint file that would run code is
refused, naming the file, before any of it runs."""

from __future__ import annotations

import json
import pathlib
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rsrefseg.models.build import build_model
from rsrefseg.platform import runs
from rsrefseg.platform.errors import UserError
from rsrefseg.training.engine import build_engine, train_step
from rsrefseg.training.safe_resume import DEEPSPEED_SAFE_GLOBALS, UnsafeCheckpoint, safe_load
from rsrefseg.training.worker import restore
from tests.conftest import single_process_group
from tests.models.helpers import make_batch, tiny_config

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def one_process_group():
    """The single-process gloo group a Ray Train worker would have (DeepSpeed needs one); an
    existing one is used as it is. DeepSpeed keeps the world group it first cloned: another
    test module's engines may have left one of a group since destroyed, so it is dropped
    before (and after) this module's engines."""
    if dist.is_initialized():
        yield
        return
    _forget_deepspeed_world_group()
    try:
        with single_process_group():
            yield
    finally:
        _forget_deepspeed_world_group()


def _forget_deepspeed_world_group() -> None:
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None


def _engine(precision: str = "fp32", overrides: list[str] = ()):
    """The train worker's engine (ZeRO-2, AdamW, warm-up + cosine) over the tiny model."""
    cfg = tiny_config(["train.batch_size=2", "train.lr=0.01", "train.warmup_epochs=0", *overrides]).resolved()
    engine, _, _ = build_engine(build_model(cfg.model), cfg.train, world_size=1, steps_per_epoch=4,
                                precision=precision)
    return engine


def _trainable(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.trainable_state_dict().items()}


def _checkpoint(path: Path):
    from ray.train import Checkpoint

    return Checkpoint.from_directory(str(path))


@pytest.fixture(scope="module")
def saved(one_process_group, tmp_path_factory):
    """A Ray Train checkpoint folder as the worker reports it (DeepSpeed state after one step +
    state.json), and the trainable weights after one more step of the engine that saved it."""
    first, second = make_batch(2, seed=1), make_batch(2, seed=2)
    engine = _engine()
    train_step(engine, first)
    folder = tmp_path_factory.mktemp("ckpt")
    engine.save_checkpoint(str(folder / runs.DEEPSPEED_DIR), tag=runs.DEEPSPEED_TAG, exclude_frozen_parameters=True)
    (folder / runs.STATE_FILE).write_text(json.dumps({"epoch": 1, "global_step": 1, "history": []}))
    train_step(engine, second)
    return SimpleNamespace(folder=folder, batch=second, after=_trainable(engine), lr=engine.get_lr())


@pytest.fixture(scope="module")
def target(one_process_group):
    """A fresh engine the tampered checkpoints are restored into (shared: each refusal leaves it
    as the first file found it)."""
    return _engine()


def test_resume_gives_back_the_optimizer_and_step_state_through_weights_only_loads(saved, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    engine = _engine()
    monkeypatch.setattr(torch, "load", spy)
    state = restore(SimpleNamespace(engine=engine), _checkpoint(saved.folder))
    monkeypatch.undo()
    assert state.epoch == 1 and state.global_step == 1
    assert len(calls) >= 2 and all(w is True for w in calls), calls  # model and ZeRO files, both weights-only
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's own load is back
    assert engine.global_steps == 1
    train_step(engine, saved.batch)
    # The same step as the engine that saved it took: Adam's moments, the step count and the
    # schedule came back (a fresh optimizer's first step would land elsewhere).
    assert engine.get_lr() == saved.lr
    after = _trainable(engine)
    assert after.keys() == saved.after.keys()
    for key in after:
        torch.testing.assert_close(after[key], saved.after[key], rtol=0, atol=0, msg=key)


class _TouchOnLoad:
    """Unpickles as `Path(marker).touch()`: any code the store's writer likes could run instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_a_checkpoint_file_that_would_run_code_is_refused_before_it_runs(saved, target, tmp_path, name):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved.folder, folder)
    tampered = folder / runs.DEEPSPEED_DIR / runs.DEEPSPEED_TAG / name
    assert tampered.is_file()
    marker = tmp_path / "ran"
    original = torch.load(tampered, weights_only=False)
    # The real file's keys, one value replaced: the file passes for a DeepSpeed checkpoint.
    key = "optimizer_state_dict" if name == OPTIM_STATES else "global_steps"
    torch.save({**original, key: _TouchOnLoad(marker)}, tampered)

    with pytest.raises(UnsafeCheckpoint) as caught:
        restore(SimpleNamespace(engine=target), _checkpoint(folder))
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    assert message.startswith(f"{tampered}: ") and "pathlib.PosixPath" in message
    assert not marker.exists()
    assert "load" not in vars(target.checkpoint_engine)

    torch.load(tampered, weights_only=False)  # the control: a full unpickle runs the payload
    assert marker.exists()


def test_a_bare_pickle_is_refused_too(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / MODEL_STATES
    path.write_bytes(pickle.dumps(_TouchOnLoad(marker), protocol=2))
    with pytest.raises(UnsafeCheckpoint, match=rf"^{re.escape(str(path))}: refused .* holds getattr "):
        safe_load(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("precision, stage", [("bf16", 2), ("fp16", 2), ("fp32", 1)])
def test_every_precision_and_stage_saves_only_the_allowed_objects(one_process_group, tmp_path, precision, stage):
    # fp16 keeps a DynamicLossScaler, the others a LossScaler; the ZeRO files of every stage
    # the config allows hold the same few objects (stage 0 holds none: it is the fp32 run's
    # model file). A DeepSpeed upgrade that saves another fails here first.
    engine = _engine(precision, [f"train.zero_stage={stage}"])
    train_step(engine, make_batch(2))
    engine.save_checkpoint(str(tmp_path), tag="t", exclude_frozen_parameters=True)
    files = sorted((tmp_path / "t").glob("*.pt"))
    assert len(files) == 2
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in DEEPSPEED_SAFE_GLOBALS}
    for f in files:
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f))) <= allowed, f.name
        assert isinstance(safe_load(str(f), map_location="cpu"), dict)


def test_a_restart_from_object_storage_reads_a_copy_that_no_other_worker_rewrites(saved, monkeypatch):
    # Ray's `as_directory` downloads a remote checkpoint into one folder per host, and a second
    # worker of the host may download it again into that folder while the first one reads it.
    # Here the second worker's download lands while restore loads: it is caught mid-rewrite,
    # every file of the host's folder truncated.
    import pyarrow.fs
    from ray.train import Checkpoint

    from rsrefseg.training import safe_resume

    store = pyarrow.fs.SubTreeFileSystem(str(saved.folder.parent), pyarrow.fs.LocalFileSystem())
    remote = Checkpoint(saved.folder.name, filesystem=store)
    hosts_folder = Path(remote._get_temporary_checkpoint_dir())
    real_load, loaded_from = safe_resume.load_engine_state, []

    def load_while_another_worker_downloads(engine, load_dir, tag):
        remote.to_directory()
        for file in hosts_folder.rglob("*"):
            if file.is_file():
                file.open("wb").close()
        loaded_from.append(Path(load_dir))
        real_load(engine, load_dir, tag)

    monkeypatch.setattr(safe_resume, "load_engine_state", load_while_another_worker_downloads)
    try:
        engine = _engine()
        state = restore(SimpleNamespace(engine=engine), remote)
    finally:
        shutil.rmtree(hosts_folder, ignore_errors=True)
    assert state.epoch == 1 and state.global_step == 1 and engine.global_steps == 1
    assert hosts_folder not in loaded_from[0].parents
    assert not loaded_from[0].exists()  # the private copy is gone with the restore
