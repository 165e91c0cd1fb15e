"""What a registered model takes and returns, as MLflow records it with the model: the one
description that `rsrefseg register` logs and the served model (`serving/mlflow_model.py`) reads."""

from __future__ import annotations

IMAGE, TEXT, MASK = "image", "text", "mask"


def model_signature():
    """What the logged model takes and returns: `image` binary (a file's bytes; an array passes
    too, binary columns being Python objects), `text` string; one 2-D bool mask per row."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE), ColSpec(DataType.string, TEXT)]),
        outputs=Schema([ColSpec(Array(Array(DataType.boolean)), MASK)]),
    )
