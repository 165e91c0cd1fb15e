"""`rsrefseg evaluate`: metrics of a checkpoint on one split, in the paper's row layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rsrefseg.platform import tracking
from rsrefseg.platform.config import ConfigError
from rsrefseg.platform.ray_session import init_ray

METRIC_COLUMNS = ("Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "cIoU", "gIoU")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a model checkpoint folder, a train run folder (its best/) or a Ray checkpoint (model/)."""
    from rsrefseg.jobs.train import BEST_DIR
    from rsrefseg.jobs.train_loop import MODEL_DIR

    p = Path(path)
    for candidate in (p, p / BEST_DIR, p / MODEL_DIR):
        if (candidate / "weights.safetensors").is_file() or (candidate / "config.yaml").is_file():
            return candidate
    if not p.exists():
        raise ConfigError(f"--checkpoint {p}: no such file or folder")
    raise ConfigError(
        f"--checkpoint {p}: not a checkpoint; expected weights.safetensors and config.yaml in it, "
        f"in {p / BEST_DIR} (a train run folder) or in {p / MODEL_DIR} (a Ray checkpoint)"
    )


def format_row(metrics: dict, label: str = "") -> str:
    """The paper-style table row: Pr@0.5..0.9, cIoU, gIoU (percent)."""
    head = "| " + " | ".join(([""] if label else []) + list(METRIC_COLUMNS)) + " |"
    sep = "|" + "---|" * (len(METRIC_COLUMNS) + (1 if label else 0))
    cells = ([label] if label else []) + [f"{metrics[c]:.2f}" for c in METRIC_COLUMNS]
    return "\n".join([head, sep, "| " + " | ".join(cells) + " |"])


def run_evaluate(
    checkpoint: str,
    *,
    split: str = "test",
    overrides: list[str] | None = None,
    out: str | None = None,
    batch_size: int = 8,
) -> dict:
    """Evaluate on `split` of the checkpoint's dataset (or `data.path=...` from overrides)."""
    from rsrefseg.datasets.pipeline import iter_batches
    from rsrefseg.datasets.prepare import load_manifest
    from rsrefseg.jobs.train import build_datasets
    from rsrefseg.models.checkpoint import load_checkpoint
    from rsrefseg.models.metrics import SegMetrics
    from rsrefseg.platform.capacity import describe_resources

    ckpt_dir = resolve_checkpoint(checkpoint)
    model, cfg = load_checkpoint(ckpt_dir)
    # Only data/tracking/cluster may change at evaluation time; the model is the checkpoint's.
    for item in overrides or []:
        if not item.split("=", 1)[0].startswith(("data.", "tracking.", "cluster.")):
            raise ConfigError(f"{item.split('=', 1)[0]}: evaluate takes only data.*, tracking.* and cluster.* overrides")
    cfg = tracking.resolved(cfg.replace(overrides or []))
    manifest = load_manifest(cfg.data.path)
    if split not in manifest["counts"]:
        raise ConfigError(f"--split {split}: not in {cfg.data.path} (it has {', '.join(sorted(manifest['counts']))})")

    init_ray(cfg.cluster)
    ds = build_datasets(cfg, splits={"eval": split})["eval"]
    model.eval()
    acc = SegMetrics()
    with torch.no_grad():
        for batch in iter_batches(ds, batch_size, timeout_s=cfg.train.batch_timeout_s, on_timeout=describe_resources):
            logits = model(**{k: batch[k] for k in ("sam_image", "siglip_image", "input_ids", "attention_mask")})
            acc.update(logits > 0, batch["mask"])
    metrics = acc.compute()
    result = {
        "checkpoint": str(ckpt_dir),
        "dataset": cfg.data.path,
        "dataset_hash": manifest.get("content_hash", ""),
        "split": split,
        "metrics": metrics,
    }
    print(format_row(metrics, label=f"{Path(cfg.data.path).name}/{split}"))
    if out:
        _write_json(Path(out), result)
        print(f"[rsrefseg] wrote {out}")
    if cfg.tracking.enabled:
        run_id = tracking.start_run(
            cfg, run_name=f"evaluate-{split}",
            tags={"rsrefseg.job": "evaluate", "rsrefseg.checkpoint": str(ckpt_dir),
                  "rsrefseg.dataset_hash": result["dataset_hash"]},
        )
        c = tracking.client(cfg.tracking)
        tracking.log_metrics(c, run_id, {f"{split}/{k}": v for k, v in metrics.items()}, step=0)
        c.log_dict(run_id, result, f"evaluation/{split}.json")
        c.set_terminated(run_id, "FINISHED")
        result["mlflow_run_id"] = run_id
    return result


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
