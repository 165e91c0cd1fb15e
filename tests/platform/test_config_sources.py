"""data.sources: several prepared datasets in one run, by name, each with a weight."""

from pathlib import Path

import pytest

from rsrefseg.platform import paths
from rsrefseg.platform.config import Config, DataSource, load_config
from rsrefseg.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MIXED = REPO / "configs/demo-mixed.yaml"


def test_no_sources_is_data_path_alone():
    cfg = Config()
    assert cfg.data.sources == {}
    assert cfg.data.source_list() == [DataSource("", cfg.data.path, 1.0)]
    assert cfg.data.source_path_keys() == ["data.path"]


def test_sources_keep_their_order_and_dotted_keys_reach_each_one():
    cfg = load_config(MIXED, ["data.sources.synth_a.weight=3", "data.sources.extra.path=data/x"])
    assert [(s.name, s.weight) for s in cfg.data.source_list()] == [("synth_a", 3.0), ("synth_b", 2.0), ("extra", 1.0)]
    assert cfg.flat()["data.sources.synth_b.weight"] == 2.0
    assert cfg.data.source_path_keys()[-1] == "data.sources.extra.path"
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, key", [
    ("data.sources.synth_a.weight=0", "data.sources.synth_a.weight"),
    ("data.sources.synth_a.weight=-1", "data.sources.synth_a.weight"),
    ("data.sources.bad name.path=x", "data.sources.bad name"),
    ("data.sources.new.weight=2", "data.sources.new.path"),  # a source needs a path
    ("data.sources.synth_a.path=", "data.sources.synth_a.path"),
    ("data.sources.synth_a.colour=red", "data.sources.synth_a.colour"),
    ("data.sources.synth_a.path=s3://user:secret@bucket/x", "data.sources.synth_a.path"),
    ("data.sources=[a, b]", "data.sources"),
])
def test_bad_sources_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(MIXED, [override])
    assert str(err.value).startswith(key + ":"), str(err.value)
    assert "secret" not in str(err.value)


def test_source_paths_resolve_against_the_project_and_back(tmp_path):
    cfg = load_config(MIXED, [f"paths.root={tmp_path}"])
    local = paths.localize(cfg)
    assert local.data.sources["synth_b"].path == str(tmp_path / "data/demo2/prepared")
    assert paths.portable(local).data.sources["synth_b"].path == "data/demo2/prepared"
    with pytest.raises(ConfigError, match=r"^data.sources.synth_a.path: .* does not exist"):
        paths.require(local, local.data.source_path_keys())
