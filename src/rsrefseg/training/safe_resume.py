"""Load a train worker's DeepSpeed state without unpickling arbitrary objects from the run store.

DeepSpeed reads the files of a checkpoint through its engine's checkpoint engine, and its
`TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`: a full unpickle, so whoever
can write the run store (train.storage_path) could run code on every worker at `--resume` or at
a restart. `deepspeed.initialize` builds that checkpoint engine itself from the config and takes
none of ours, so `load_engine_state` replaces the `load` of this one engine's checkpoint engine,
for the span of one `engine.load_checkpoint`, with `torch.load(weights_only=True)` that allows
tensors, plain containers and numbers, and exactly the DeepSpeed objects that the ZeRO
checkpoints of this project hold (DEEPSPEED_SAFE_GLOBALS). A file that holds anything else is
refused before any of it is built, with an error that names the file.

Found by saving this project's engines (stages 0, 1 and 2; fp32, bf16 and fp16) and listing the
globals of every file with `torch.serialization.get_unsafe_globals_in_checkpoint`: the model-state
file (`mp_rank_00_model_states.pt`) holds none; the ZeRO optimizer-state files
(`[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`) hold the four below. A DeepSpeed upgrade
that adds one makes resume fail with that name in the message: check the new class builds nothing
but data before adding it.
"""

from __future__ import annotations

import contextlib
import pickle
import re

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from rsrefseg.platform.errors import UserError

# The non-tensor objects a ZeRO optimizer-state file holds (ZeRO stage 1/2's `state_dict()`):
DEEPSPEED_SAFE_GLOBALS = (
    LossScaler,  # "loss_scaler" (fp32 and bf16 runs): a static scale, its attributes numbers
    DynamicLossScaler,  # "loss_scaler" (fp16 runs): the dynamic scale's counters, numbers
    ZeroStageEnum,  # "zero_stage": an int enum
    fragment_address,  # "param_slice_mappings": a dataclass of two ints (numel, start)
)


class UnsafeCheckpoint(UserError):
    """A DeepSpeed checkpoint file holds objects beyond tensors and the allowed DeepSpeed ones."""


def load_engine_state(engine, load_dir: str, tag: str) -> None:
    """`engine.load_checkpoint(load_dir, tag)` (module, optimizer, scheduler and step state of a
    DeepSpeed engine), every file read with `torch.load(weights_only=True)`.

    Raises UnsafeCheckpoint naming the file that holds anything else, and UserError when the
    folder holds no DeepSpeed state for `tag`."""
    with weights_only_loads(engine):
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=False)
    if load_path is None:
        raise UserError(f"{load_dir}: no DeepSpeed checkpoint with tag {tag!r} to resume from")


@contextlib.contextmanager
def weights_only_loads(engine):
    """While open, `engine`'s checkpoint engine loads with `safe_load` (its `load` is replaced on
    this instance only; other engines, and DeepSpeed's class, are left as they are)."""
    checkpoint_engine = engine.checkpoint_engine
    if not isinstance(checkpoint_engine, TorchCheckpointEngine):
        # Another engine comes only from a DeepSpeed `checkpoint` config this project never sets;
        # its file format is not the one checked here.
        raise RuntimeError(f"resume reads DeepSpeed's TorchCheckpointEngine files only, not "
                           f"{type(checkpoint_engine).__name__}'s")
    checkpoint_engine.load = safe_load
    try:
        yield
    finally:
        del checkpoint_engine.load  # back to the class's method


def safe_load(path: str, map_location=None):
    """One DeepSpeed checkpoint file, as `TorchCheckpointEngine.load` reads it, but through
    torch's weights-only unpickler with DEEPSPEED_SAFE_GLOBALS allowed for this call."""
    try:
        with torch.serialization.safe_globals(list(DEEPSPEED_SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpoint(
            f"{path}: refused to load DeepSpeed state that holds {_refused_globals(path, error)} "
            "(only tensors, plain data and DeepSpeed's ZeRO checkpoint objects are loaded); "
            "resume only from a run store that no one else can write"
        ) from error


def _refused_globals(path: str, error: Exception) -> str:
    """The globals of `path` the weights-only load refuses, read without unpickling."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in DEEPSPEED_SAFE_GLOBALS}
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:  # not a zip checkpoint (a bare or a legacy pickle): torch's message names one
        names = re.findall(r"GLOBAL (\S+)", str(error))[:1]
    return ", ".join(sorted(set(names))) if names else "objects that are not plain data"
