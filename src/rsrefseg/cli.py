"""The `rsrefseg` command line: one subcommand per job.

Config-taking commands accept `--config FILE` and dotted overrides after it
(`rsrefseg train --config configs/demo.yaml train.epochs=1 model.lora.sam_rank=8`).
Errors a user can fix (config, data, checkpoints) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rsrefseg.platform.config import ConfigError
from rsrefseg.platform.errors import TrainingFailed, TrainingInterrupted


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsrefseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the built-in synthetic dataset (RefSegRS layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=300, help="number of triplets")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("prepare", help="validate a dataset and write Parquet shards + manifest")
    p.add_argument("--format", required=True, choices=["refsegrs", "rrsisd", "fiftyone", "synthetic"])
    p.add_argument("--root", required=True, help="the dataset as distributed")
    p.add_argument("--out", required=True, help="where the prepared dataset goes")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad triplets, listing them in the manifest")
    p.add_argument("--mask-threshold", type=int, default=128, metavar="N",
                   help="8-bit mask values >= N are foreground (default 128; 1 = any non-zero pixel)")

    p = sub.add_parser("train", help="train with Ray Train + DeepSpeed ZeRO-2, tracked in MLflow")
    _add_config_args(p, required=False)
    p.add_argument("--resume", metavar="RUN", help="continue the run folder RUN (name under train.storage_path)")

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a split (paper-style row)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="write the result as JSON here (per-sample rows go beside it as .samples.parquet)")
    p.add_argument("--batch-size", type=int, help="samples per model call of each replica (evaluate.batch_size, 8)")
    p.add_argument("--replicas", type=int, help="model replicas (evaluate.replicas; default one per GPU, else one)")
    p.add_argument("--gpus-per-replica", type=float, help="evaluate.gpus_per_replica (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--gallery", type=int, metavar="K", help="the K worst and K best samples as an MLflow figure (evaluate.gallery, 4)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="data.*, tracking.*, cluster.*, paths.*, evaluate.* overrides")

    p = sub.add_parser("predict", help="segment images (a file or a folder, GeoTIFFs of any size) from phrases")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True, help="an image file or a folder of them")
    p.add_argument("--text", required=True, action="append", help="a phrase; repeat for several")
    p.add_argument("--out", required=True,
                   help="the mask (0/255) for one image and one phrase, else a folder of <image>.<phrase>.png|tif")
    p.add_argument("--overlay", help="also write the image with the mask overlaid (one image, one phrase)")
    p.add_argument("--tile", type=int, default=0, help="tile side in px (default: whole image up to 2048 px, else 512)")
    p.add_argument("--overlap", type=float, default=0.25, help="share of a tile that neighbours overlap")
    p.add_argument("--gsd", type=float, default=0.0, help="metres per pixel of the training data: a GeoTIFF is resampled to it")
    p.add_argument("--geojson", action="store_true", help="also write a GeoTIFF's mask as GeoJSON polygons")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when there is a GPU")
    p.add_argument("--replicas", type=int, default=0, help="model replicas for a folder (default: one per GPU, else one)")

    p = sub.add_parser("register", help="register a checkpoint as an MLflow model (models:/NAME/VERSION)")
    p.add_argument("--checkpoint", required=True, help="a run folder, its best/ folder or a Ray checkpoint")
    p.add_argument("--name", required=True, help="the registered model's name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="tracking.* overrides (the store to register in)")

    p = sub.add_parser("tune", help="Ray Tune sweep (e.g. the paper's ablation table)")
    _add_config_args(p, required=False)
    p.add_argument("--sweep", help="sweep file, e.g. configs/sweeps/ablation.yaml")
    p.add_argument("--resume", metavar="SWEEP", help="continue an interrupted sweep folder")

    p = sub.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API)")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--root", help="absolute path of the project folder on the cluster's nodes, where the job's "
                                  "relative data/weights/runs paths resolve (default: the RSREFSEG_HOME the "
                                  "nodes run with; cluster.yaml: /home/ray/rsrefseg)")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- train|evaluate|tune ARGS")

    p = sub.add_parser("jobs", help="list, follow or stop submitted jobs")
    p.add_argument("action", choices=["list", "logs", "stop", "status"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address")

    p = sub.add_parser("ui", help="open the MLflow UI on the project's store (127.0.0.1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--tracking-uri", help="default: the project-local store")

    p = sub.add_parser("mlflow-server", help="run an MLflow tracking server for a cluster")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default="", help="default: sqlite:///<project>/mlflow.db; or postgresql://...")
    p.add_argument("--artifacts-destination", default="", help="default: <project>/mlartifacts; or s3://...")
    p.add_argument("--allowed-hosts", default="",
                   help="Host headers the server answers, comma-separated (MLflow's default: localhost and "
                        "private IPs); add the name or address clients use to reach it, e.g. 203.0.113.7:5000")

    p = sub.add_parser("demo", help="synthetic data -> prepare -> train (tiny, 2 workers) -> evaluate")
    p.add_argument("--out", default="data/demo")
    p.add_argument("--size", type=int, default=0, help="synthetic triplets (default: the recipe's)")
    p.add_argument("--control", action="store_true", help="also train the text-blind control (phrases shuffled)")
    _add_config_args(p, required=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    _stop_on_sigterm()
    try:
        return _dispatch(args) or 0
    except TrainingInterrupted as exc:
        print(f"rsrefseg {args.command}{_where()}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"rsrefseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"rsrefseg {args.command}{_where()}: config error: {exc}", file=sys.stderr)
        return 2
    except _user_errors() as exc:
        print(f"rsrefseg {args.command}{_where()}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"rsrefseg {args.command}{_where()}: {exc}", file=sys.stderr)
        return 1


def _stop_on_sigterm() -> None:
    """SIGTERM (`rsrefseg jobs stop`, `ray job stop`, a scheduler) ends a command as Ctrl-C does,
    so that it can close its MLflow run before Ray's grace period ends in SIGKILL."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _where() -> str:
    """In a submitted job, paths are the cluster's: say which machine lacked them."""
    import os
    import socket

    from rsrefseg.jobs.submit import SUBMITTED_ENV

    if os.environ.get(SUBMITTED_ENV):
        return (f" (Ray job driver on cluster host {socket.gethostname()}; paths resolve there, relative ones "
                "against paths.root: `rsrefseg submit --root DIR` or paths.root=DIR)")
    return ""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (not a bug): one clear line, no traceback."""
    from rsrefseg.datasets.triplet import DatasetError
    from rsrefseg.models.checkpoint import CheckpointError
    from rsrefseg.models.presets import ModelLoadError

    errors = (DatasetError, CheckpointError, ModelLoadError, FileNotFoundError)
    if "ray" in sys.modules:  # a cluster that wants a token we could not find: Ray's message says where to put it
        from ray.exceptions import AuthenticationError

        errors += (AuthenticationError,)
    return errors


def _dispatch(args: argparse.Namespace) -> int | None:
    from rsrefseg.platform.config import load_config

    cmd = args.command
    if cmd == "demo-data":
        from rsrefseg.datasets.synthetic import generate

        path = generate(args.out, size=args.size, seed=args.seed)
        print(f"[rsrefseg] wrote {args.size} synthetic triplets to {path} (RefSegRS layout)")
    elif cmd == "prepare":
        from rsrefseg.jobs.prepare import run_prepare

        run_prepare(args.format, args.root, args.out, skip_invalid=args.skip_invalid, mask_threshold=args.mask_threshold)
    elif cmd == "train":
        from rsrefseg.jobs.train import run_train

        if args.resume and (args.config or args.overrides):
            raise ConfigError("--resume continues a run with its own saved config; drop --config and overrides")
        cfg = load_config(args.config, args.overrides) if not args.resume else None
        outcome = run_train(cfg or load_config(None), config_file=args.config, resume=args.resume)
        print(f"[rsrefseg] best checkpoint (epoch {outcome.best_metrics['epoch']}, "
              f"val gIoU {outcome.best_metrics['val/gIoU']:.2f}): {outcome.best_checkpoint}")
    elif cmd == "evaluate":
        from rsrefseg.jobs.evaluate import run_evaluate

        run_evaluate(args.checkpoint, split=args.split, overrides=args.overrides, out=args.out,
                     batch_size=args.batch_size, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                     gallery=args.gallery)
    elif cmd == "register":
        from rsrefseg.jobs.register import run_register

        run_register(args.checkpoint, args.name, overrides=args.overrides)
    elif cmd == "predict":
        from rsrefseg.jobs.predict import run_predict

        run_predict(args.checkpoint, image=args.image, text=args.text, out=args.out, overlay=args.overlay,
                    tile=args.tile, overlap=args.overlap, gsd=args.gsd, geojson=args.geojson, cpu=args.cpu,
                    replicas=args.replicas)
    elif cmd == "tune":
        from rsrefseg.jobs.tune import run_tune

        if args.resume and (args.config or args.overrides or args.sweep):
            raise ConfigError("--resume continues a sweep with its own saved config and sweep file; "
                              "drop --config, --sweep and overrides")
        cfg = load_config(args.config, args.overrides)
        run_tune(cfg, sweep_file=args.sweep, resume=args.resume, config_file=args.config)
    elif cmd == "submit":
        from rsrefseg.jobs.submit import run_submit

        return run_submit(args.job, address=args.address, wait=not args.no_wait, root=args.root)
    elif cmd == "jobs":
        from rsrefseg.jobs.submit import run_jobs

        return run_jobs(args.action, args.job_id, address=args.address)
    elif cmd == "ui":
        from rsrefseg.jobs.ui import run_ui

        return run_ui(host=args.host, port=args.port, tracking_uri=args.tracking_uri)
    elif cmd == "mlflow-server":
        from rsrefseg.jobs.ui import run_mlflow_server

        return run_mlflow_server(host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
                                 artifacts_destination=args.artifacts_destination, allowed_hosts=args.allowed_hosts)
    elif cmd == "demo":
        from rsrefseg.jobs.demo import run_demo

        cfg = load_config(args.config or "configs/demo.yaml", args.overrides)
        run_demo(cfg, out=args.out, size=args.size, control=args.control)
    return None
