"""Batch inference with Ray Data: model replicas as `map_batches` actors (a preprocessed split for
`evaluate`, a list of scene files for `predict`).

Each replica rebuilds the model once from the checkpoint (its config and trainable weights travel
through the object store, so any node can run one; the frozen base weights load from the paths
in the config, as on the training workers), then scores batch after batch with the same
`inference.scoring.score` as training's validation. Replicas take one GPU each where the
cluster has GPUs (forward under bf16 autocast), else CPUs. Only the per-sample records leave the
actors (a few numbers per sample), never masks or images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Replicas:
    """How many model replicas, and what each takes."""

    count: int = 1
    gpus: float = 0.0  # per replica; > 0 runs the forward on a GPU under bf16 autocast
    cpus: float = 1.0  # per replica
    batch_size: int = 8


def replica_model(payload: Any):
    """(model on its device, config, device, autocast dtype) of one replica, from the checkpoint
    payload `(config, trainable state)` (or an object ref to it)."""
    from rsrefseg.inference.scoring import inference_device
    from rsrefseg.models.build import build_model

    config, state = payload if isinstance(payload, tuple) else _resolve(payload)
    device, autocast = inference_device()
    model = build_model(config.model, config.data.label_size, gpu=device.type == "cuda")
    model.load_trainable_state_dict(state)
    return model.to(device).eval(), config, device, autocast


class Scorer:
    """The map_batches actor: model built once, then one call per batch -> per-sample records."""

    def __init__(self, payload: Any, empty_iou: float = 1.0):
        from rsrefseg.models.presets import input_sizes

        self.model, config, self.device, self.autocast = replica_model(payload)
        self.sizes = input_sizes(config.model, config.data.label_size)
        self.empty_iou = empty_iou

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rsrefseg.inference.scoring import score

        # Resized on the replica's device; only the per-sample records leave the actor.
        records = score(self.model, batch, self.sizes, self.device, autocast=self.autocast, empty_iou=self.empty_iou)
        return {k: np.asarray(v, dtype=object if k in ("id", "phrase", "category", "source", "size") else None) for k, v in records.items()}


def _resolve(ref):
    import ray

    return ray.get(ref)


def score_split(ds, config, state: dict, replicas: Replicas, *, empty_iou: float = 1.0) -> dict[str, list]:
    """Per-sample records (columns) of every sample of the preprocessed dataset `ds`."""
    import ray
    import ray.data

    payload = ray.put((config, state))
    scored = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"payload": payload, "empty_iou": empty_iou},
        batch_size=replicas.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=replicas.count),
        num_gpus=replicas.gpus,
        num_cpus=replicas.cpus,
    )
    columns: dict[str, list] = {}
    for batch in scored.iter_batches(batch_size=256, batch_format="numpy"):
        for key, values in batch.items():
            columns.setdefault(key, []).extend(v.item() if isinstance(v, np.generic) else v for v in values)
    return columns
