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

from rsrefseg.jobs import session
from rsrefseg.models.checkpoint_folder import checkpoint_source, find_checkpoint
from rsrefseg.platform import paths, tracking
from rsrefseg.platform.atomic import atomic_file, write_json
from rsrefseg.platform.config import Config
from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.metric_names import METRIC_NAMES

log = logging.getLogger(__name__)

# Papers name the same two metrics three ways; the headers say both so numbers line up.
HEADERS = {"cIoU": "cIoU (=oIoU)", "gIoU": "gIoU (=mIoU)"}
CONVENTIONS = ("gIoU = mIoU = mean of per-sample IoU; cIoU = oIoU = total intersection / total union; "
               "Pr@X = share of samples with IoU > X")
SAMPLE_COLUMNS = ("id", "phrase", "category", "source", "size", "iou", "intersection", "union", "gt_area", "pred_area", "pixels")


def format_row(metrics: dict, label: str = "") -> str:
    """The paper-style table row: Pr@0.5..0.9, cIoU, gIoU (percent)."""
    return format_table({label: metrics}, first=label and " ")


def format_table(rows: dict[str, dict], *, first: str = "") -> str:
    """A markdown table, one row per entry of `rows` (label -> metrics in percent): Pr@0.5..0.9,
    cIoU, gIoU, plus the sample count when the metrics carry one. `first`: the label column's
    header ("" = no label column)."""
    with_count = all("count" in m for m in rows.values()) and len(rows) > 1
    columns = [HEADERS.get(c, c) for c in METRIC_NAMES] + (["n"] if with_count else [])
    head = "| " + " | ".join(([first.strip()] if first else []) + columns) + " |"
    sep = "|" + "---|" * (len(columns) + (1 if first else 0))
    lines = [head, sep]
    for label, m in rows.items():
        cells = ([label] if first else []) + [f"{m[c]:.2f}" for c in METRIC_NAMES] + ([str(m["count"])] if with_count else [])
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
    from rsrefseg.models.checkpoint import load_checkpoint

    ckpt_dir = find_checkpoint(checkpoint)
    source = checkpoint_source(checkpoint, ckpt_dir)
    model, cfg = load_checkpoint(ckpt_dir)
    given = {"batch_size": batch_size, "replicas": replicas, "gpus_per_replica": gpus_per_replica, "gallery": gallery}
    cfg = evaluation_config(cfg, overrides, {f"evaluate.{k}": v for k, v in given.items() if v is not None})
    inputs = session.dataset_inputs(cfg, _probe_split(cfg, split), {"evaluation": split})
    session.start_ray(cfg, ingest=False)
    tags = {"rsrefseg.checkpoint": source, "rsrefseg.dataset_hash": session.dataset_hash(inputs)}
    dataset = ", ".join(s.path for s in cfg.data.source_list())
    about = {"sources": {s.name: s.path for s in cfg.data.source_list()}} if cfg.data.sources else {}
    with session.open_run(cfg, job="evaluate", run_name=f"evaluate-{split}", tags=tags, inputs=inputs) as run:
        rows = _score(cfg, model, split)
        result = summarize(rows, checkpoint=source, dataset=dataset, **about,
                           dataset_hash=session.dataset_hash(inputs), split=split)
        _print_result(result, "mixture" if cfg.data.sources else dataset, split)
        samples = _samples_table(rows)
        if out:
            result["samples"] = _write_result(Path(out), result, samples)
        if run.client is not None:
            examples = gallery_examples(cfg, model, split, rows, k=cfg.evaluate.gallery)
            _log_to_mlflow(run, cfg, result, samples, split, examples)
            result["mlflow_run_id"] = run.run_id
    return result


def evaluation_config(cfg: Config, overrides: list[str] | None, evaluate: dict) -> Config:
    """The checkpoint's config as this evaluation runs it: only data/tracking/cluster/paths/
    evaluate may change (the model is the checkpoint's), relative paths on this command line
    resolve here (paths.root as given now, not the training machine's), evaluate.* validated
    before Ray."""
    for item in overrides or []:
        if not item.split("=", 1)[0].startswith(("data.", "tracking.", "cluster.", "paths.", "evaluate.")):
            raise ConfigError(f"{item.split('=', 1)[0]}: evaluate takes only data.*, tracking.*, cluster.*, "
                              "paths.* and evaluate.* overrides")
    return session.resolve(cfg.replace(["paths.root=", *(overrides or [])])).replace(evaluate)


def _probe_split(cfg: Config, split: str) -> dict[str, dict]:
    """Each prepared dataset's manifest (source name -> manifest; "" for data.path), once its
    folder and `split` are known to be there."""
    from rsrefseg.datasets.prepare import MANIFEST

    paths.require(cfg, cfg.data.source_path_keys())
    session.probe_inputs(cfg, MANIFEST)
    return session.check_splits(cfg, (("--split", split),))


def _score(cfg: Config, model, split: str) -> dict[str, list]:
    """Per-sample records of the whole split, from model replicas on the cluster."""
    from rsrefseg.inference.replicas import score_split
    from rsrefseg.inference.streams import build_datasets

    ds = build_datasets(cfg, splits={"eval": split})["eval"]
    replicas = plan_replicas(cfg, batch_size=cfg.evaluate.batch_size, count=cfg.evaluate.replicas,
                             gpus=cfg.evaluate.gpus_per_replica)
    log.info("scoring %s/%s with %s", [s.path for s in cfg.data.source_list()], split, replicas)
    return score_split(ds, cfg, model.trainable_state_dict(), replicas)


def _print_result(result: dict, dataset: str, split: str) -> None:
    """The paper's row, the tables by source (a mixture), by category (a mixture: one per source)
    and by object size, and the conventions."""
    print(format_row(result["metrics"], label=f"{Path(dataset).name}/{split}"))
    if result.get("by_source"):
        print(f"\nby source ({split}; the first row's numbers are the mixture's):\n"
              + format_table(result["by_source"], first="source"))
    for source in result.get("by_source") or [""]:
        prefix = f"{source}/" if source else ""
        table = {k[len(prefix):]: m for k, m in result["by_category"].items() if k.startswith(prefix)}
        print(f"\nby category ({prefix}{split}):\n" + format_table(table, first="category"))
    print(f"\nby object size (ground truth's share of the image; {split}):\n"
          + format_table(result["by_size"], first="size"))
    print(f"\n{CONVENTIONS}")


def _write_result(out: Path, result: dict, samples) -> str:
    """The JSON result at `out`, one Parquet row per sample beside it; returns the Parquet path."""
    parquet = out.with_suffix(".samples.parquet")
    _write_parquet(parquet, samples)
    write_json(out, {**result, "samples": str(parquet)})
    say(f"wrote {out} and {parquet} (one row per sample)")
    return str(parquet)


def gallery_examples(cfg, model, split: str, rows: dict[str, list], *, k: int) -> list[dict]:
    """The k worst then the k best samples by IoU, predicted again in this process: only those
    2k samples are read and preprocessed (the scoring pass kept no pixels)."""
    from ray.data.expressions import col

    from rsrefseg.datasets.pipeline import iter_batches, preprocess, read_split
    from rsrefseg.inference.gallery import Gallery
    from rsrefseg.inference.scoring import score
    from rsrefseg.models.presets import input_sizes
    from rsrefseg.models.tokenizer import load_tokenizer

    order = sorted(range(len(rows.get("id", []))), key=lambda i: (rows["iou"][i], rows["id"][i]))
    sources = rows.get("source") or [""] * len(order)
    wanted = {(sources[i], rows["id"][i]) for i in order[:k] + order[-k:]} if k else set()
    if not wanted:
        return []
    sizes = input_sizes(cfg.model, cfg.data.label_size)
    gallery = Gallery(k)
    model.eval()
    for source in cfg.data.source_list():  # ids are a source's own: looked up in it
        ids = sorted(i for s, i in wanted if s == source.name)
        if ids:
            ds = read_split(source.path, split).filter(expr=col("id").is_in(ids))  # Arrow-side filter
            for batch in iter_batches(preprocess(ds, sizes, load_tokenizer(cfg.model), source=source.name), 8):
                score(model, batch, sizes, "cpu", gallery=gallery)
    return gallery.examples()


def plan_replicas(cfg, *, batch_size: int, count: int = 0, gpus: float = -1):
    """Model replicas for this cluster: one per GPU (one GPU each) when it has GPUs, else one
    replica taking every CPU but those Ray Data's preprocessing needs (`train.ingest_cpus`), up to
    what its biggest node has (see `replica_cpus`). count / gpus override (0 / -1 = decide)."""
    import ray

    from rsrefseg.inference.replicas import Replicas
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
    """The JSON result: overall metrics (a mixture's: the mixture), by source (a mixture), by
    category (a mixture: keyed `<source>/<category>`, each source its own names), by object size
    (all in percent)."""
    import torch

    from rsrefseg.models.metrics import SIZE_BUCKETS, SegMetrics, metrics_by

    overall = SegMetrics()
    if rows.get("id"):
        overall.add(torch.tensor(rows["intersection"]), torch.tensor(rows["union"]))
    mixed = any(rows.get("source") or [])
    return {
        **about,
        "metrics": overall.compute(),
        "by_source": metrics_by(rows, "source") if mixed else {},
        "by_category": _by_category(rows, mixed) if rows.get("id") else {},
        "by_size": metrics_by(rows, "size", order=tuple(b for b, _ in SIZE_BUCKETS)) if rows.get("id") else {},
        "size_buckets": {label: f"ground truth < {upper:.0%} of the image" if upper != float("inf") else "the rest"
                         for label, upper in SIZE_BUCKETS},
        "conventions": CONVENTIONS,
    }


def _by_category(rows: dict[str, list], mixed: bool) -> dict[str, dict]:
    """metrics_by category; of a mixture, per source (keys `<source>/<category>`)."""
    from rsrefseg.models.metrics import metrics_by

    if not mixed:
        return metrics_by(rows, "category")
    out = {}
    for source in dict.fromkeys(rows["source"]):
        index = [i for i, s in enumerate(rows["source"]) if s == source]
        part = {key: [values[i] for i in index] for key, values in rows.items()}
        out.update({f"{source}/{name}": m for name, m in metrics_by(part, "category").items()})
    return out


def _samples_table(rows: dict[str, list]):
    import pyarrow as pa

    from rsrefseg.datasets.prepare import natural_key

    sources = rows.get("source") or [""] * len(rows.get("id", []))
    order = sorted(range(len(rows.get("id", []))), key=lambda i: (sources[i], natural_key(rows["id"][i])))
    return pa.table({c: [rows[c][i] for i in order] if c in rows else [""] * len(order) for c in SAMPLE_COLUMNS})


def _log_to_mlflow(run: session.Run, cfg: Config, result: dict, samples, split: str, examples: list[dict]) -> None:
    import tempfile

    from rsrefseg.inference.gallery import prediction_image

    c, run_id = run.client, run.run_id
    metrics = {f"{split}/{k}": v for k, v in result["metrics"].items()}
    for name, m in result.get("by_source", {}).items():  # as validation names them: val/<source>/gIoU
        metrics.update({f"{split}/{_metric_safe(name)}/{k}": v for k, v in m.items()})
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


def _metric_safe(name: str) -> str:
    """A group name as MLflow metric names allow ("<1%" -> "lt1pct", ">=20%" -> "ge20pct")."""
    name = name.replace(">=", "ge").replace("<", "lt").replace("%", "pct")
    return re.sub(r"[^\w\-. :/]", "_", name)


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
