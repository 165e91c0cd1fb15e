"""Errors of the model package that callers catch by type."""

from rsrefseg.platform.errors import UserError


class ModelLoadError(UserError, RuntimeError):
    """Pretrained backbone weights are unset, missing, unreadable, or of the wrong model.

    The message names the config key, the expected file and where users get it.
    """


def state_dict_problems(expected: dict, state: dict) -> list[str]:
    """What keeps `state` from loading into a module whose state dict is `expected`:
    missing keys, unexpected keys and shape mismatches, a few examples of each (empty = fits)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: got {tuple(state[k].shape)}, model has {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
    return problems
