"""`rsrefseg evaluate`: metrics of a checkpoint on one split, as a Ray Data batch-inference job.

Model replicas score the split in Ray Data actors (one GPU each where the cluster has GPUs),
with the forward and metric code of training's validation. Output: the paper's row, a row per
category and per object size (tables name both metric conventions), a JSON with all three, and
one Parquet row per sample beside it; all logged to an MLflow run of its own.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from rsrefseg.platform import paths, storage, tracking
from rsrefseg.models.checkpoint_folder import checkpoint_source, find_checkpoint
from rsrefseg.platform.atomic import atomic_file, write_json
from rsrefseg.platform import runs
from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.ray_session import init_ray

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "cIoU", "gIoU")
# Papers name the same two metrics three ways; the headers say both so numbers line up.
HEADERS = {"cIoU": "cIoU (=oIoU)", "gIoU": "gIoU (=mIoU)"}
CONVENTIONS = ("gIoU = mIoU = mean of per-sample IoU; cIoU = oIoU = total intersection / total union; "
               "Pr@X = share of samples with IoU > X")
SAMPLE_COLUMNS = ("id", "phrase", "category", "size", "iou", "intersection", "union", "gt_area", "pred_area", "pixels")


def format_row(metrics: dict, label: str = "") -> str:
    """The paper-style table row: Pr@0.5..0.9, cIoU, gIoU (percent)."""
    return format_table({label: metrics}, first=label and " ")


def format_table(rows: dict[str, dict], *, first: str = "") -> str:
    """A markdown table, one row per entry of `rows` (label -> metrics in percent): Pr@0.5..0.9,
    cIoU, gIoU, plus the sample count when the metrics carry one. `first`: the label column's
    header ("" = no label column)."""
    with_count = all("count" in m for m in rows.values()) and len(rows) > 1
    columns = [HEADERS.get(c, c) for c in METRIC_COLUMNS] + (["n"] if with_count else [])
    head = "| " + " | ".join(([first.strip()] if first else []) + columns) + " |"
    sep = "|" + "---|" * (len(columns) + (1 if first else 0))
    lines = [head, sep]
    for label, m in rows.items():
        cells = ([label] if first else []) + [f"{m[c]:.2f}" for c in METRIC_COLUMNS] + ([str(m["count"])] if with_count else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_evaluate(
    checkpoint: str,
    *,
    split: str = "test",
    overrides: list[str] | None = None,
    out: str | None = None,
    batch_size: int | None = None,
    replicas: int | None = None,
    gpus_per_replica: float | None = None,
    gallery: int | None = None,
) -> dict:
    """Evaluate on `split` of the checkpoint's dataset (or `data.path=...` from overrides).

    batch_size, replicas, gpus_per_replica, gallery: the `evaluate.*` config keys, given here
    (None = the config's): model replicas and GPUs each (0 / -1: one per GPU when the cluster
    has GPUs, else one CPU replica; see `plan_replicas`); the k worst and k best samples go to
    MLflow as a figure (0 = none).
    """
    from rsrefseg.datasets.batch_inference import score_split
    from rsrefseg.datasets.prepare import MANIFEST, load_manifest
    from rsrefseg.training.ingest import build_datasets
    from rsrefseg.models.checkpoint import load_checkpoint

    ckpt_dir = find_checkpoint(checkpoint)
    source = checkpoint_source(checkpoint, ckpt_dir)
    model, cfg = load_checkpoint(ckpt_dir)
    # Only data/tracking/cluster/paths may change at evaluation time; the model is the checkpoint's.
    for item in overrides or []:
        if not item.split("=", 1)[0].startswith(("data.", "tracking.", "cluster.", "paths.", "evaluate.")):
            raise ConfigError(f"{item.split('=', 1)[0]}: evaluate takes only data.*, tracking.*, cluster.*, "
                              "paths.* and evaluate.* overrides")
    # Relative paths on this command line resolve here (paths.root as given now), not against
    # the root of the machine that trained the checkpoint.
    cfg = runs.resolve_paths(cfg.replace(["paths.root=", *(overrides or [])]))
    paths.require(cfg, ["data.path"])
    storage.check_readable("data.path", cfg.data.path, MANIFEST)
    manifest = load_manifest(cfg.data.path)
    if split not in manifest["counts"]:
        raise ConfigError(f"--split {split}: not in {cfg.data.path} (it has {', '.join(sorted(manifest['counts']))})")

    given = {"batch_size": batch_size, "replicas": replicas, "gpus_per_replica": gpus_per_replica, "gallery": gallery}
    cfg = cfg.replace({f"evaluate.{k}": v for k, v in given.items() if v is not None})  # validated before Ray

    init_ray(cfg.cluster)
    ds = build_datasets(cfg, splits={"eval": split})["eval"]
    replicas = plan_replicas(cfg, batch_size=cfg.evaluate.batch_size, count=cfg.evaluate.replicas, gpus=cfg.evaluate.gpus_per_replica)
    log.info("scoring %s/%s with %s", cfg.data.path, split, replicas)
    rows = score_split(ds, cfg, model.trainable_state_dict(), replicas)
    result = summarize(rows, checkpoint=source, dataset=cfg.data.path,
                       dataset_hash=manifest.get("content_hash", ""), split=split)
    label = f"{Path(cfg.data.path).name}/{split}"
    print(format_row(result["metrics"], label=label))
    print(f"\nby category ({split}):\n" + format_table(result["by_category"], first="category"))
    print(f"\nby object size (ground truth's share of the image; {split}):\n" + format_table(result["by_size"], first="size"))
    print(f"\n{CONVENTIONS}")
    samples = _samples_table(rows)
    if out:
        parquet = Path(out).with_suffix(".samples.parquet")
        _write_parquet(parquet, samples)
        result["samples"] = str(parquet)
        write_json(Path(out), result)
        print(f"[rsrefseg] wrote {out} and {parquet} (one row per sample)")
    if cfg.tracking.enabled:
        examples = gallery_examples(cfg, model, split, rows, k=cfg.evaluate.gallery)
        result["mlflow_run_id"] = _log_to_mlflow(cfg, result, samples, source, split, examples, manifest)
    return result


def gallery_examples(cfg, model, split: str, rows: dict[str, list], *, k: int) -> list[dict]:
    """The k worst then the k best samples by IoU, predicted again in this process: only those
    2k samples are read and preprocessed (the scoring pass kept no pixels)."""
    from ray.data.expressions import col

    from rsrefseg.datasets.pipeline import iter_batches, preprocess, read_split
    from rsrefseg.training.reporting import Gallery
    from rsrefseg.models.device_inputs import model_batch
    from rsrefseg.models.inference import predict_logits, score_batch
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.tokenizer import load_tokenizer

    order = sorted(range(len(rows.get("id", []))), key=lambda i: (rows["iou"][i], rows["id"][i]))
    wanted = {rows["id"][i] for i in order[:k] + order[-k:]} if k else set()
    if not wanted:
        return []
    ds = read_split(cfg.data.path, split).filter(expr=col("id").is_in(sorted(wanted)))  # Arrow-side filter
    sizes = input_sizes(cfg.model, cfg.data.label_size)
    ds = preprocess(ds, sizes, load_tokenizer(cfg.model))
    gallery = Gallery(k)
    model.eval()
    for batch in iter_batches(ds, 8):
        batch = model_batch(batch, sizes, "cpu", originals=True)
        logits = predict_logits(model, batch, "cpu")
        gallery.offer(batch, logits > 0, score_batch(logits, batch)["iou"])
    return gallery.examples()


def plan_replicas(cfg, *, batch_size: int, count: int = 0, gpus: float = -1):
    """Model replicas for this cluster: one per GPU (one GPU each) when it has GPUs, else one
    replica taking every CPU but those Ray Data's preprocessing needs (`train.ingest_cpus`), up to
    what its biggest node has (see `replica_cpus`). count / gpus override (0 / -1 = decide)."""
    import ray

    from rsrefseg.datasets.batch_inference import Replicas
    from rsrefseg.platform.capacity import cluster_cpus, largest_node_cpus

    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 0:
        gpus = 1.0 if cluster_gpus else 0.0
    if gpus > 0:
        return Replicas(count=count or max(1, int(cluster_gpus / gpus)), gpus=gpus, cpus=1.0, batch_size=batch_size)
    count = count or 1
    cpus = replica_cpus(cluster_cpus(), largest_node_cpus(), ingest=cfg.train.ingest_cpus, count=count)
    return Replicas(count=count, gpus=0.0, cpus=cpus, batch_size=batch_size)


def replica_cpus(cluster: float, largest_node: float, *, ingest: float, count: int) -> float:
    """CPUs per CPU replica: the cluster's, less ingest's, shared by `count`; but never more than
    one node has, since an actor cannot span nodes (one replica of a two-node cluster's CPUs would
    wait forever). A node not up yet (an autoscaler's, `largest_node` 0) sets no bound."""
    cpus = max(1.0, (cluster - ingest) // count)
    return max(1.0, min(cpus, largest_node)) if largest_node else cpus


def summarize(rows: dict[str, list], **about) -> dict:
    """The JSON result: overall metrics, by category, by object size (all in percent)."""
    import torch

    from rsrefseg.models.metrics import SIZE_BUCKETS, SegMetrics, metrics_by

    overall = SegMetrics()
    if rows.get("id"):
        overall.add(torch.tensor(rows["intersection"]), torch.tensor(rows["union"]))
    return {
        **about,
        "metrics": overall.compute(),
        "by_category": metrics_by(rows, "category") if rows.get("id") else {},
        "by_size": metrics_by(rows, "size", order=tuple(b for b, _ in SIZE_BUCKETS)) if rows.get("id") else {},
        "size_buckets": {label: f"ground truth < {upper:.0%} of the image" if upper != float("inf") else "the rest"
                         for label, upper in SIZE_BUCKETS},
        "conventions": CONVENTIONS,
    }


def _samples_table(rows: dict[str, list]):
    import pyarrow as pa

    from rsrefseg.datasets.prepare import natural_key

    order = sorted(range(len(rows.get("id", []))), key=lambda i: natural_key(rows["id"][i]))
    return pa.table({c: [rows[c][i] for i in order] for c in SAMPLE_COLUMNS})


def _log_to_mlflow(cfg, result: dict, samples, source: str, split: str, examples: list[dict], manifest: dict) -> str:
    import tempfile

    from rsrefseg.training.reporting import prediction_image

    run_id = tracking.start_run(
        cfg, run_name=f"evaluate-{split}",
        tags={"rsrefseg.job": "evaluate", "rsrefseg.checkpoint": source,
              "rsrefseg.dataset_hash": result["dataset_hash"]},
    )
    with tracking.run_lifecycle(cfg.tracking, run_id) as c:
        tracking.log_dataset(c, run_id, manifest, cfg.data.path, {"evaluation": split})
        metrics = {f"{split}/{k}": v for k, v in result["metrics"].items()}
        for group in ("by_category", "by_size"):
            for name, m in result[group].items():
                metrics[f"{split}/{group}/{_metric_safe(name)}/gIoU"] = m["gIoU"]
        tracking.log_metrics(c, run_id, metrics, step=0)
        c.log_dict(run_id, {k: v for k, v in result.items() if k != "samples"}, f"evaluation/{split}.json")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{split}.samples.parquet"
            _write_parquet(path, samples)
            c.log_artifact(run_id, str(path), "evaluation")
        if examples:
            image = prediction_image(examples, title=f"{split}: worst and best samples by IoU")
            c.log_image(run_id, image, artifact_file=f"evaluation/{split}_gallery.png")
    return run_id


def _metric_safe(name: str) -> str:
    """A group name as MLflow metric names allow ("<1%" -> "lt1pct", ">=20%" -> "ge20pct")."""
    name = name.replace(">=", "ge").replace("<", "lt").replace("%", "pct")
    return re.sub(r"[^\w\-. :/]", "_", name)


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
