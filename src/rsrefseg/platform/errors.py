"""The errors the CLI tells apart (kept free of Ray and torch imports, so that the CLI and light
commands such as `prepare` do not pay for importing them).

`UserError` is bad input a user can fix (a config key, a dataset file, a checkpoint, a missing
weight file): the CLI prints its one-line message, naming what was wrong, and exits 2. Anything
else is a bug or a failed run and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file, line, id or config key and what was wrong."""


class ConfigError(UserError, ValueError):
    """A config value is unknown, of the wrong type, or impossible. The message names the key."""


class TrainingFailed(RuntimeError):
    """The run failed after exhausting `train.max_failures`; its checkpoints are kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or a stopped job: the MLflow run is KILLED; its checkpoints are kept."""
