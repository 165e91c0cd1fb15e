from pathlib import Path

import pytest
import yaml

from rsrefseg.platform.config import Config, load_config, parse_override
from rsrefseg.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_validate_and_match_the_paper():
    cfg = load_config(None)
    assert cfg.model.lora.sam_rank == 16
    assert cfg.model.prompter.downsample_rate == 4
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.epochs == 200 and cfg.train.batch_size == 32


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    cfg = load_config(path)
    if cfg.model.preset == "tiny":
        return
    assert cfg.model.siglip_path and cfg.model.sam_checkpoint
    if cfg.model.arch == "rsrefseg":
        assert cfg.model.preset in ("rsrefseg-b", "rsrefseg-l")
        assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.batch_size == 32
        return
    # RSRefSeg-2, the authors' recipe: 8 per GPU, bf16, clipping 3, lr 2e-4 on RefSegRS (600
    # epochs), 1e-4 elsewhere (300); the architecture's defaults fill the rest.
    resolved = cfg.resolved()
    assert cfg.model.preset == "rsrefseg2-l" and "sam2.1_hiera_large.pt" in cfg.model.sam_checkpoint
    assert cfg.train.batch_size == 8 * cfg.train.num_workers and cfg.train.precision == "bf16"
    assert cfg.train.grad_clip == 3.0 and resolved.train.weight_decay == 0.05
    refsegrs = "refsegrs" in path.name
    assert cfg.train.lr == pytest.approx(2e-4 if refsegrs else 1e-4)
    assert cfg.train.epochs == (600 if refsegrs else 300)


def test_expected_recipes_exist():
    names = {p.name for p in RECIPES}
    for size in ("b", "l"):
        for ds in ("refsegrs", "rrsisd"):
            assert f"rsrefseg-{size}-{ds}.yaml" in names
    assert "demo.yaml" in names


def test_overrides_are_typed_and_applied():
    cfg = load_config(REPO / "configs/demo.yaml", ["train.epochs=1", "model.lora.sam_rank=32",
                                                    "model.prompter.dense_prompt=false", "train.lr=2e-4"])
    assert cfg.train.epochs == 1
    assert cfg.model.lora.sam_rank == 32
    assert cfg.model.prompter.dense_prompt is False
    assert cfg.train.lr == pytest.approx(2e-4)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.lora.sam_rank=0", "model.lora.sam_rank"),
        ("model.prompter.downsample_rate=3", "model.prompter.downsample_rate"),
        ("train.epochs=zero", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=5", "train.batch_size"),  # not divisible by 2 workers
        ("model.preset=huge", "model.preset"),
        ("model.lora.siglip_text_layers=some", "model.lora.siglip_text_layers"),
        ("train.epoch=3", "train.epoch"),  # a typo: unknown key
        ("trian.epochs=3", "trian"),
        ("model.prompter.dense_prompt=maybe", "model.prompter.dense_prompt"),
        ("train.precision=bf16", "train.precision"),  # bf16 without a GPU
        ("train.lr=-1", "train.lr"),
        ("model.lora=4", "model.lora"),
        ("tune.metric=val/loss", "tune.metric"),  # not a figure that ranks epochs
        ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo.yaml", [override])
    assert str(err.value).startswith(key), str(err.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 2, "lerning_rate": 1}}))
    with pytest.raises(ConfigError, match=r"train\.lerning_rate: unknown key .*bad\.yaml"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_resolved_config_round_trips_unchanged(tmp_path):
    cfg = load_config(REPO / "configs/rsrefseg-b-rrsisd.yaml", ["model.lora.sam_rank=8"])
    path = cfg.dump(tmp_path / "resolved.yaml")
    again = load_config(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["resolved.yaml"]  # no temporary left


def test_flat_params_have_the_same_names_for_every_run():
    a = load_config(None).flat()
    b = load_config(REPO / "configs/demo.yaml").flat()
    assert set(a) == set(b)
    assert "model.lora.sam_rank" in a and "model.prompter.dense_prompt" in a


def test_parse_override():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=x y") == ("a.b", "x y")
    with pytest.raises(ConfigError):
        parse_override("novalue")
    with pytest.raises(ConfigError):
        parse_override("a..b=1")


def test_replace_validates():
    cfg = Config().validate()
    assert cfg.replace({"train.epochs": 3}).train.epochs == 3
    with pytest.raises(ConfigError, match="train.epochs"):
        cfg.replace({"train.epochs": 0})
