"""`rsrefseg register`: a trained checkpoint as a registered MLflow model (`models:/<name>/<version>`).

The model is logged as code (`rsrefseg/serving/mlflow_model.py`) with the checkpoint folder
(weights.safetensors + config.yaml) as its artifact, so `mlflow.pyfunc.load_model` reads
safetensors and never unpickles a model object. The registration is an MLflow run of its own
(job "register"), linked to the training run that produced the checkpoint when known.
"""

from __future__ import annotations

from pathlib import Path

from rsrefseg.jobs import session
from rsrefseg.models.checkpoint_folder import checkpoint_source, find_checkpoint
from rsrefseg.platform import tracking
from rsrefseg.platform.config import Config
from rsrefseg.platform.console import say
from rsrefseg.platform.errors import ConfigError

MODEL_FILE = Path(__file__).resolve().parents[1] / "serving" / "mlflow_model.py"


def register_checkpoint(cfg: Config, checkpoint: str | Path, name: str, *, source_run_id: str | None = None) -> int:
    """Register the checkpoint folder as a new version of the MLflow model `name`; return the version."""
    import mlflow

    from rsrefseg.inference.signature import model_signature

    if not name.strip():
        raise ConfigError("--name: the registered model needs a name")
    if not cfg.tracking.enabled:
        raise ConfigError("tracking.enabled=false: registering a model needs the MLflow store")
    ckpt_dir = find_checkpoint(checkpoint)
    tags = {"rsrefseg.checkpoint": checkpoint_source(checkpoint, ckpt_dir)}
    if source_run_id:
        tags["rsrefseg.source_run"] = source_run_id
    with session.open_run(cfg, job="register", run_name=f"register-{name}", tags=tags) as run:
        # log_model works on the fluent API's active run: exactly this run, for the block.
        with tracking.fluent_store(cfg.tracking, run.run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_FILE),
                artifacts={"checkpoint": str(ckpt_dir)},
                signature=model_signature(),  # image: a file's bytes (or an array), text: the phrase
                registered_model_name=name,
                pip_requirements=["rsrefseg"],
            )
    version = int(info.registered_model_version)
    say(f"registered {name} version {version}: mlflow.pyfunc.load_model(\"models:/{name}/{version}\")")
    return version


def run_register(checkpoint: str, name: str, *, overrides: list[str] | None = None) -> int:
    """The CLI: the checkpoint's own config, with tracking.* overrides naming the store."""
    from rsrefseg.models.checkpoint import load_config_file

    for item in overrides or []:
        if not item.split("=", 1)[0].startswith(("tracking.", "paths.")):
            raise ConfigError(f"{item.split('=', 1)[0]}: register takes only tracking.* and paths.* overrides")
    cfg = load_config_file(find_checkpoint(checkpoint)).replace(["paths.root=", *(overrides or [])])
    return register_checkpoint(session.resolve(cfg), checkpoint, name)
