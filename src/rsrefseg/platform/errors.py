"""How a job ended badly, as the CLI tells it (kept free of Ray and torch imports, so that the
CLI and light commands such as `prepare` do not pay for importing them)."""

from __future__ import annotations


class TrainingFailed(RuntimeError):
    """The run failed after exhausting `train.max_failures`; its checkpoints are kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or a stopped job: the MLflow run is KILLED; its checkpoints are kept."""
