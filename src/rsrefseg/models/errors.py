"""Errors of the model package that callers catch by type."""


class ModelLoadError(RuntimeError):
    """Pretrained backbone weights are unset, missing, unreadable, or of the wrong model.

    The message names the config key, the expected file and where users get it.
    """
