"""Checkpoint round trip and the errors of broken checkpoints."""

from __future__ import annotations

import pytest
import torch
import yaml

from rsrefseg.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint
from rsrefseg.models.build import build_model
from tests.models.helpers import forward, make_batch, tiny_config


def _trained(config):
    """A tiny model whose trainable weights and BatchNorm statistics differ from a fresh build."""
    model = build_model(config.model, config.data.label_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        b = make_batch(2, seed=step, label=model.sizes.label)
        model.loss(forward(model, b), b["mask"]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_round_trip_gives_identical_outputs(tmp_path):
    config = tiny_config(["model.init_seed=5", "data.label_size=32"])
    model = _trained(config)
    path = save_checkpoint(model, config, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left

    loaded, loaded_config = load_checkpoint(path)
    assert loaded_config == config
    loaded.eval()
    b = make_batch(3, seed=9)
    with torch.no_grad():
        expected = forward(model, b)
        assert expected.shape == (3, 32, 32)
        assert torch.equal(forward(loaded, b), expected)
        # The checkpoint carries information: a fresh build differs.
        fresh = build_model(config.model, config.data.label_size).eval()
        assert not torch.allclose(forward(fresh, b), expected)


def test_save_replaces_an_existing_checkpoint(tmp_path):
    config = tiny_config()
    save_checkpoint(build_model(config.model), config, tmp_path / "ckpt")
    trained = _trained(config)
    save_checkpoint(trained, config, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    for k, v in trained.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[k], v), k


def test_broken_checkpoints_raise_checkpoint_error(tmp_path):
    config = tiny_config()
    good = save_checkpoint(build_model(config.model), config, tmp_path / "good")

    with pytest.raises(CheckpointError, match="config.yaml"):
        load_checkpoint(tmp_path / "nowhere")

    no_weights = save_checkpoint(build_model(config.model), config, tmp_path / "no_weights")
    (no_weights / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE}: not found"):
        load_checkpoint(no_weights)

    corrupt = save_checkpoint(build_model(config.model), config, tmp_path / "corrupt")
    (corrupt / WEIGHTS_FILE).write_bytes((good / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as info:
        load_checkpoint(corrupt)
    assert str(corrupt / WEIGHTS_FILE) in str(info.value)

    bad_yaml = save_checkpoint(build_model(config.model), config, tmp_path / "bad_yaml")
    (bad_yaml / CONFIG_FILE).write_text("model: {preset: huge}\n")
    with pytest.raises(CheckpointError, match="model.preset"):
        load_checkpoint(bad_yaml)


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"lora": {"sam_rank": 8}}, "shape mismatches"),
        ({"prompter": {"downsample_rate": 2}}, "unexpected keys"),
        ({"lora": {"siglip_text_layers": "zero"}}, "unexpected keys"),
    ],
)
def test_weights_of_another_model_shape_raise(tmp_path, edit, needle):
    config = tiny_config()
    path = save_checkpoint(build_model(config.model), config, tmp_path / "ckpt")
    data = yaml.safe_load((path / CONFIG_FILE).read_text())
    for section, values in edit.items():
        data["model"][section].update(values)
    (path / CONFIG_FILE).write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match=needle) as info:
        load_checkpoint(path)
    assert str(path / WEIGHTS_FILE) in str(info.value)


def test_checkpoint_names_no_folder_of_the_training_machine(tmp_path, monkeypatch):
    # What a train worker saves: the driver's config with every path made absolute on its host.
    from rsrefseg.jobs.session import resolve as resolve_paths

    trainer_home, other_home = tmp_path / "trainer", tmp_path / "elsewhere"
    outside = tmp_path / "shared" / "prepared"
    config = resolve_paths(tiny_config([f"paths.root={trainer_home}", "data.path=data/demo/prepared",
                                        "train.storage_path=runs", "model.sam_checkpoint=weights/sam.pth"]))
    assert config.data.path == f"{trainer_home}/data/demo/prepared" and config.tracking.uri.endswith("mlflow.db")
    path = save_checkpoint(build_model(config.model), config.replace({"model.siglip_path": str(outside)}),
                           tmp_path / "ckpt")
    text = (path / CONFIG_FILE).read_text()
    assert str(trainer_home) not in text
    saved = yaml.safe_load(text)
    assert saved["data"]["path"] == "data/demo/prepared" and saved["model"]["sam_checkpoint"] == "weights/sam.pth"
    assert saved["train"]["storage_path"] == "runs" and saved["paths"]["root"] == ""
    assert saved["tracking"]["uri"] == "" and saved["tracking"]["artifact_location"] == ""
    assert saved["model"]["siglip_path"] == str(outside)  # given outside the project: kept as given

    # Loaded on another machine: its paths resolve against that machine's project folder.
    monkeypatch.setenv("RSREFSEG_HOME", str(other_home))
    _, loaded = load_checkpoint(path)
    assert resolve_paths(loaded).data.path == f"{other_home}/data/demo/prepared"
    assert resolve_paths(loaded).tracking.uri == f"sqlite:///{other_home}/mlflow.db"
