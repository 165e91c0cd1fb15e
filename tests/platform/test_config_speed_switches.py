"""The speed switches' defaults: `auto` decided by where the model runs."""

from __future__ import annotations

import pytest

from rsrefseg.platform.config import Config, load_config
from rsrefseg.platform.errors import ConfigError


def test_auto_switches_are_on_for_gpu_and_off_for_cpu():
    model = Config().model
    assert model.compile_backbones == "auto" and model.channels_last == "auto"
    gpu, cpu = model.on_device(True), model.on_device(False)
    assert gpu.compile_backbones is True and gpu.channels_last is True
    assert cpu.compile_backbones is False and cpu.channels_last is False
    forced = Config().replace(["model.compile_backbones=false", "model.channels_last=true"]).model
    assert forced.on_device(True).compile_backbones is False and forced.on_device(False).channels_last is True


def test_auto_switches_round_trip_and_reject_other_words(tmp_path):
    path = tmp_path / "config.yaml"
    Config().replace(["model.channels_last=true"]).dump(path)
    again = load_config(path).model
    assert again.compile_backbones == "auto" and again.channels_last is True
    with pytest.raises(ConfigError, match="model.compile_backbones"):
        Config().replace(["model.compile_backbones=yes-please"])
