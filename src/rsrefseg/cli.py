"""The `rsrefseg` command line: one subcommand per job.

Config-taking commands accept `--config FILE` and dotted overrides after it
(`rsrefseg train --config configs/demo.yaml train.epochs=1 model.lora.sam_rank=8`).
Errors a user can fix (config, data, checkpoints) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Callable

from rsrefseg.jobs.ui import SERVER_WORKERS
from rsrefseg.platform import console
from rsrefseg.platform.config import load_config
from rsrefseg.platform.paths import redact
from rsrefseg.platform import signals
from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.errors import TrainingFailed, TrainingInterrupted, UserError
from rsrefseg.platform.recipes import find_recipe


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its arguments, and what it runs (imported when it runs, so
    a light command never pays for Ray or torch). Adding a command is adding one entry."""

    name: str
    help: str
    args: tuple[tuple[tuple[str, ...], dict], ...]
    run: Callable[[argparse.Namespace], int | None]


def arg(*flags: str, **options) -> tuple[tuple[str, ...], dict]:
    return flags, options


CONFIG_ARGS = (
    arg("--config", help="YAML recipe: a file, or a shipped recipe's name (demo, rsrefseg-b-rrsisd, ...)"),
    arg("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=1"),
)


def port(value: str) -> int:
    """A TCP port number (1-65535), for argparse: a bad one is a usage error, not a traceback."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a port number (1-65535)")
    return number


def _recipe(value: str | None) -> str | None:
    """The file a --config value names (a shipped recipe's name included), as MLflow records it."""
    return str(find_recipe(value)) if value else None


def _demo_data(args) -> None:
    from rsrefseg.datasets.synthetic import generate

    path = generate(args.out, size=args.size, seed=args.seed)
    console.say(f"wrote {args.size} synthetic triplets to {path} (RefSegRS layout)")


def _prepare(args) -> None:
    from rsrefseg.jobs.prepare import run_prepare

    run_prepare(args.format, args.root, args.out, skip_invalid=args.skip_invalid, mask_threshold=args.mask_threshold,
                max_pixels=args.max_pixels, keep_non_english=args.keep_non_english, ray_address=args.ray_address)


def _train(args) -> None:
    from rsrefseg.jobs.train import run_train

    if args.resume and (args.config or args.overrides):
        raise ConfigError("--resume continues a run with its own saved config; drop --config and overrides")
    config = _recipe(args.config)
    outcome = run_train(load_config(config, args.overrides), config_file=config, resume=args.resume)
    console.say(f"best checkpoint (epoch {outcome.best_metrics['epoch']}, "
                f"val gIoU {outcome.best_metrics['val/gIoU']:.2f}): {outcome.best_checkpoint}")


def _evaluate(args) -> None:
    from rsrefseg.jobs.evaluate import run_evaluate

    run_evaluate(args.checkpoint, split=args.split, overrides=args.overrides, out=args.out,
                 batch_size=args.batch_size, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                 gallery=args.gallery)


def _predict(args) -> None:
    from rsrefseg.jobs.predict import run_predict

    run_predict(args.checkpoint, image=args.image, text=args.text, out=args.out, overlay=args.overlay,
                tile=args.tile, overlap=args.overlap, gsd=args.gsd, geojson=args.geojson, cpu=args.cpu,
                replicas=args.replicas)


def _register(args) -> None:
    from rsrefseg.jobs.register import run_register

    run_register(args.checkpoint, args.name, overrides=args.overrides)


def _tune(args) -> None:
    from rsrefseg.jobs.tune import run_tune

    if args.resume and (args.config or args.overrides or args.sweep):
        raise ConfigError("--resume continues a sweep with its own saved config and sweep file; "
                          "drop --config, --sweep and overrides")
    config = _recipe(args.config)
    run_tune(load_config(config, args.overrides), sweep_file=args.sweep, resume=args.resume, config_file=config)


def _submit(args) -> int:
    from rsrefseg.jobs.submit import run_submit

    return run_submit(args.job, address=args.address, wait=not args.no_wait, root=args.root)


def _jobs(args) -> int:
    from rsrefseg.jobs.submit import run_jobs

    return run_jobs(args.action, args.job_id, address=args.address)


def _ui(args) -> int:
    from rsrefseg.jobs.ui import run_ui

    return run_ui(host=args.host, port=args.port, tracking_uri=args.tracking_uri)


def _mlflow_server(args) -> int:
    from rsrefseg.jobs.ui import run_mlflow_server

    return run_mlflow_server(host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
                             artifacts_destination=args.artifacts_destination, allowed_hosts=args.allowed_hosts,
                             workers=args.workers, auth=args.auth, auth_database_uri=args.auth_database_uri)


def _demo(args) -> None:
    from rsrefseg.jobs.demo import run_demo

    run_demo(load_config(_recipe(args.config or "demo"), args.overrides), out=args.out, size=args.size,
             control=args.control)


COMMANDS = (
    Command("demo-data", "write the built-in synthetic dataset (RefSegRS layout)", (
        arg("--out", required=True),
        arg("--size", type=int, default=300, help="number of triplets"),
        arg("--seed", type=int, default=0),
    ), _demo_data),
    Command("prepare", "validate a dataset and write Parquet shards + manifest", (
        arg("--format", required=True, choices=["refsegrs", "rrsisd", "fiftyone", "synthetic", "risbench", "nwpu-refer", "remotesam"]),
        arg("--root", required=True, help="the dataset as distributed"),
        arg("--out", required=True, help="where the prepared dataset goes"),
        arg("--skip-invalid", action="store_true", help="skip bad triplets, listing them in the manifest"),
        arg("--mask-threshold", type=int, default=128, metavar="N",
            help="8-bit mask values >= N are foreground (default 128; 1 = any non-zero pixel)"),
        arg("--max-pixels", type=int, default=100_000_000, metavar="N",
            help="refuse, before decoding, an image or mask of more than N pixels (default 100000000)"),
        arg("--keep-non-english", action="store_true", default=None,
            help="risbench, nwpu-refer, remotesam: keep the Chinese or mixed expressions (default: left out; "
                 "counted in the manifest either way)"),
        arg("--ray-address", metavar="ADDRESS",
            help="decode on the nodes of this Ray cluster (auto, HOST:6379, ray://HOST:10001) instead of local "
                 "threads; every node must see --root at the same path (default: this machine's threads)"),
    ), _prepare),
    Command("train", "train with Ray Train + DeepSpeed ZeRO-2, tracked in MLflow", (
        *CONFIG_ARGS,
        arg("--resume", metavar="RUN", help="continue the run folder RUN (name under train.storage_path)"),
    ), _train),
    Command("evaluate", "metrics of a checkpoint on a split (paper-style row)", (
        arg("--checkpoint", required=True),
        arg("--split", default="test"),
        arg("--out", help="write the result as JSON here (per-sample rows go beside it as .samples.parquet)"),
        arg("--batch-size", type=int, help="samples per model call of each replica (evaluate.batch_size, 8)"),
        arg("--replicas", type=int, help="model replicas (evaluate.replicas; default one per GPU, else one)"),
        arg("--gpus-per-replica", type=float,
            help="evaluate.gpus_per_replica (default 1 when the cluster has GPUs, else 0)"),
        arg("--gallery", type=int, metavar="K",
            help="the K worst and K best samples as an MLflow figure (evaluate.gallery, 4)"),
        arg("overrides", nargs="*", metavar="key=value",
            help="data.*, tracking.*, cluster.*, paths.*, evaluate.* overrides"),
    ), _evaluate),
    Command("predict", "segment images (a file or a folder, GeoTIFFs of any size) from phrases", (
        arg("--checkpoint", required=True),
        arg("--image", required=True, help="an image file or a folder of them"),
        arg("--text", required=True, action="append", help="a phrase; repeat for several"),
        arg("--out", required=True,
            help="the mask (0/255) for one image and one phrase, else a folder of <image>.<phrase>.png|tif: "
                 "<image> is the file's stem (its whole name where two images share a stem), <phrase> the "
                 "phrase itself where it is lower-case letters, digits and dashes (at most 60), else its slug "
                 "plus 8 hex digits of its SHA-1, so no two masks of a call share a file"),
        arg("--overlay", help="also write the image with the mask overlaid (one image, one phrase)"),
        arg("--tile", type=int, default=0, help="tile side in px (default: whole image up to 2048 px, else 512)"),
        arg("--overlap", type=float, default=0.25, help="share of a tile that neighbours overlap"),
        arg("--gsd", type=float, default=0.0,
            help="metres per pixel of the training data: a GeoTIFF is resampled to it"),
        arg("--geojson", action="store_true", help="also write a GeoTIFF's mask as GeoJSON polygons"),
        arg("--cpu", action="store_true", help="stay on the CPU even when there is a GPU"),
        arg("--replicas", type=int, default=0, help="model replicas for a folder (default: one per GPU, else one)"),
    ), _predict),
    Command("register", "register a checkpoint as an MLflow model (models:/NAME/VERSION)", (
        arg("--checkpoint", required=True, help="a run folder, its best/ folder or a Ray checkpoint"),
        arg("--name", required=True, help="the registered model's name"),
        arg("overrides", nargs="*", metavar="key=value", help="tracking.* overrides (the store to register in)"),
    ), _register),
    Command("tune", "Ray Tune sweep (e.g. the paper's ablation table)", (
        *CONFIG_ARGS,
        arg("--sweep", help="sweep file, or a shipped sweep's name, e.g. grid (default: ablation)"),
        arg("--resume", metavar="SWEEP", help="continue an interrupted sweep folder"),
    ), _tune),
    Command("submit", "submit a job to a Ray cluster (Ray Jobs API)", (
        arg("--address", help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)"),
        arg("--no-wait", action="store_true", help="print the job id and return"),
        arg("--root", help="absolute path of the project folder on the cluster's nodes, where the job's "
                           "relative data/weights/runs paths resolve (default: the RSREFSEG_HOME the "
                           "nodes run with; cluster.yaml: /home/ray/rsrefseg)"),
        arg("job", nargs=argparse.REMAINDER, help="-- train|evaluate|tune ARGS"),
    ), _submit),
    Command("jobs", "list, follow or stop submitted jobs", (
        arg("action", choices=["list", "logs", "stop", "status"]),
        arg("job_id", nargs="?"),
        arg("--address"),
    ), _jobs),
    Command("ui", "open the MLflow UI on the project's store (127.0.0.1)", (
        arg("--host", default="127.0.0.1"),
        arg("--port", type=port, default=5000),
        arg("--tracking-uri", help="default: the project-local store"),
    ), _ui),
    Command("mlflow-server", "run an MLflow tracking server for a cluster", (
        arg("--host", default="127.0.0.1"),
        arg("--port", type=port, default=5000),
        arg("--backend-store-uri", default="", help="default: sqlite:///<project>/mlflow.db; or postgresql://..."),
        arg("--artifacts-destination", default="",
            help="default: <project>/mlartifacts; or s3://BUCKET/PREFIX, written by this server with this "
                 "machine's AWS settings (checked before it starts); clients need only the server's URL"),
        arg("--allowed-hosts", default="",
            help="Host headers the server answers, comma-separated (MLflow's default: localhost and "
                 "private IPs); add the name or address clients use to reach it, e.g. 203.0.113.7:5000"),
        arg("--workers", type=int, default=SERVER_WORKERS,
            help=f"server processes (MLflow's default {SERVER_WORKERS}; 1 for a few clients)"),
        arg("--auth", action="store_true",
            help="require a user and password on every request (MLflow's basic-auth app); the admin user "
                 "comes from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD in this environment, "
                 "clients sign in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"),
        arg("--auth-database-uri", default="",
            help="with --auth: where users and permissions live (default: basic_auth.db beside a SQLite "
                 "--backend-store-uri; required with another backend)"),
    ), _mlflow_server),
    Command("demo", "synthetic data -> prepare -> train (tiny, 2 workers) -> evaluate", (
        arg("--out", default="data/demo"),
        arg("--size", type=int, default=0, help="synthetic triplets (default: the recipe's)"),
        arg("--control", action="store_true", help="also train the text-blind control (phrases shuffled)"),
        *CONFIG_ARGS,
    ), _demo),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsrefseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="also show Ray's and other libraries' own output (progress bars, INFO logs) "
                             "here, not only in the command's log file")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, parents=[common])
        for flags, options in command.args:
            p.add_argument(*flags, **options)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The console shows the platform's lines, warnings and errors; Ray's and the other libraries'
    # own output goes to the command's log file (--verbose: here too).
    console.setup(args.command, args.verbose)
    # botocore says at INFO where it found credentials, each time an S3 check looks: noise on
    # every command that touches s3://, and an error's one line would no longer be one line.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    # SIGTERM (`rsrefseg jobs stop`, `ray job stop`, a scheduler) ends a command as Ctrl-C does.
    signals.install_sigterm_interrupts()
    try:
        return args.run(args) or 0
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
    except OSError as exc:  # a disk full, a permission refused, a name taken: say which file and why
        print(f"rsrefseg {args.command}{_where()}: error: {_os_error(exc)}", file=sys.stderr)
        return 2


def _os_error(exc: OSError) -> str:
    """An OSError in one line: the file(s) it names and the system's reason."""
    files = " -> ".join(redact(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return f"{files}: {reason}" if files else reason


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
    errors: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
    if "ray" in sys.modules:  # a cluster that wants a token we could not find: Ray's message says where to put it
        from ray.exceptions import AuthenticationError

        errors += (AuthenticationError,)
    return errors
