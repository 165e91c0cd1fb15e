"""A checkpoint registered as an MLflow model loads by models:/ and predicts like `rsrefseg predict`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.types import DataType
from PIL import Image

from rsrefseg.cli import main


def test_registered_model_predicts_from_bytes_or_arrays_and_never_reads_a_path(tiny_checkpoint, tmp_path, capsys):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["register", "--checkpoint", str(tiny_checkpoint), "--name", "rsrefseg-tiny",
                 f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path / 'artifacts'}"]) == 0
    assert 'models:/rsrefseg-tiny/1' in capsys.readouterr().out

    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(image), "--text", "road",
                 "--out", str(tmp_path / "mask.png"), "--cpu"]) == 0
    expected = np.asarray(Image.open(tmp_path / "mask.png")) > 0

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/rsrefseg-tiny/1")
    rgb = np.asarray(Image.open(image).convert("RGB"))
    (from_bytes,) = model.predict(pd.DataFrame({"image": [image.read_bytes()], "text": ["road"]}))
    (from_array,) = model.predict([{"image": rgb, "text": "road"}])
    np.testing.assert_array_equal(from_bytes, expected)
    np.testing.assert_array_equal(from_array, expected)
    tiff = tmp_path / "scene.tif"
    Image.fromarray(rgb).save(tiff)
    (from_tiff,) = model.predict(pd.DataFrame({"image": [tiff.read_bytes()], "text": ["road"]}))
    np.testing.assert_array_equal(from_tiff, expected)

    # The signature: what a served model takes (a binary column: base64 in JSON) and returns.
    signature = model.metadata.signature
    assert signature is not None
    assert {c.name: c.type for c in signature.inputs.inputs} == {"image": DataType.binary, "text": DataType.string}
    assert [c.name for c in signature.outputs.inputs] == ["mask"]

    # A caller names no file on the serving machine: a path (str or Path) is refused, unread.
    secret = tmp_path / "secret.png"
    secret.write_bytes(image.read_bytes())
    for given in (str(secret), secret):
        with pytest.raises(MlflowException, match="file path or other string is not accepted"):
            model.predict(pd.DataFrame({"image": [given], "text": ["road"]}))
    with pytest.raises(MlflowException, match="not a readable PNG, JPEG or TIFF"):
        model.predict(pd.DataFrame({"image": [b"<VRTDataset>/etc/passwd</VRTDataset>"], "text": ["road"]}))
    with pytest.raises(MlflowException, match="not RGB uint8"):
        model.predict([{"image": rgb.astype(np.float32), "text": "road"}])

    # Logged as code with the safetensors checkpoint: no pickled model object to load.
    local = Path(mlflow.artifacts.download_artifacts("models:/rsrefseg-tiny/1", dst_path=str(tmp_path / "dl")))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert "weights.safetensors" in files and "mlflow_model.py" in files, files
    assert not any(name.endswith((".pkl", ".pickle")) for name in files), files
    version = MlflowClient(uri).get_model_version("rsrefseg-tiny", "1")
    assert MlflowClient(uri).get_run(version.run_id).data.tags["rsrefseg.job"] == "register"


def test_register_without_a_name_or_store_is_refused(tiny_checkpoint, tmp_path, capsys):
    assert main(["register", "--checkpoint", str(tiny_checkpoint), "--name", " "]) == 2
    assert "needs a name" in capsys.readouterr().err
    assert main(["register", "--checkpoint", str(tiny_checkpoint), "--name", "x", "train.epochs=3"]) == 2
    assert "only tracking.* and paths.*" in capsys.readouterr().err
