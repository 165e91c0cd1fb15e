"""The public API at the package's top level: the documented example runs as written, and each
function does what docs/api.md says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import rsrefseg

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_the_documented_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, f"{DOC} shows no python example"
    monkeypatch.chdir(tmp_path)  # the example writes its checkpoint where it runs
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), {})
    assert (tmp_path / "my-checkpoint" / "weights.safetensors").is_file()
    assert "[[" in capsys.readouterr().out  # the token ids it prints


def test_the_api_is_the_documented_one():
    documented = set(re.findall(r"`rsrefseg\.(\w+)\(", DOC.read_text()))
    assert documented == set(rsrefseg.__all__)
    assert all(callable(getattr(rsrefseg, name)) for name in rsrefseg.__all__)


def test_a_checkpoint_round_trips_and_predicts_the_same(tmp_path):
    cfg = rsrefseg.load_config("demo", ["data.label_size=64"])
    model = rsrefseg.build_model(cfg)
    rgb = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    before = rsrefseg.predict(model, cfg, [rgb, rgb[:50]], ["road", "building"], device="cpu")
    rsrefseg.save_checkpoint(model, cfg, tmp_path / "ckpt")
    loaded, loaded_cfg = rsrefseg.load_checkpoint(tmp_path / "ckpt")
    after = rsrefseg.predict(loaded, loaded_cfg, [rgb, rgb[:50]], ["road", "building"], device="cpu")
    assert [m.shape for m in before] == [(90, 120), (50, 120)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_predict_refuses_a_phrase_count_that_does_not_match(tmp_path):
    cfg = rsrefseg.load_config("demo")
    with pytest.raises(ValueError, match="2 images but 3 phrases"):
        rsrefseg.predict(rsrefseg.build_model(cfg), cfg, [np.zeros((8, 8, 3), np.uint8)] * 2, ["a", "b", "c"])


def test_a_recipe_by_name_and_by_path_are_the_same_config():
    shipped = Path(rsrefseg.__file__).parent / "configs" / "demo.yaml"
    assert rsrefseg.load_config("demo") == rsrefseg.load_config(shipped)
