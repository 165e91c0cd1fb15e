"""Sweep files and the ablation table, without Ray."""

from pathlib import Path

import pytest
import yaml

from rsrefseg.platform.metric_names import METRIC_NAMES
from rsrefseg.training import sweep as sweeps
from rsrefseg.platform.config import load_config
from rsrefseg.platform.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASE = load_config(REPO / "configs/rsrefseg-b-rrsisd.yaml")


def test_ablation_runs_the_shared_default_once():
    sw = sweeps.load_sweep(REPO / "configs/sweeps/ablation.yaml", BASE)
    trials = sw.trials()
    assert len(trials) == 8
    assert len({tuple(sorted(t.items())) for t in trials}) == 8
    default = {"model.lora.sam_rank": 16, "model.lora.siglip_text_layers": "full",
               "model.prompter.downsample_rate": 4, "model.prompter.dense_prompt": True}
    assert trials.count(default) == 1
    # Every trial differs from the default in at most one axis.
    for t in trials:
        assert sum(t[k] != v for k, v in default.items()) <= 1


def test_grid_is_the_cross_product():
    sw = sweeps.load_sweep(REPO / "configs/sweeps/grid.yaml", BASE)
    assert len(sw.trials()) == 3 * 3 * 3 * 2


def test_variants_sweep_moves_the_whole_group_per_trial():
    sw = sweeps.load_sweep(REPO / "configs/sweeps/variants.yaml", BASE)
    trials = sw.trials()
    assert len(trials) == 4
    names = [sw.run_name(t) for t in trials]
    assert names[0] == "variant=paper, dice_weight=0" and len(set(names)) == 4
    for t in trials:
        cfg = BASE.replace(t).resolved()
        assert cfg.model.prompter.sparse_branch == t["model.variant"]
        assert cfg.train.weight_decay == (0.05 if t["model.variant"] == "official" else 0.01)
        assert cfg.model.dice_weight == t["model.dice_weight"]


def test_any_config_key_can_be_swept(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump({"mode": "grid", "axes": [{"key": "train.lr", "values": [1e-4, 3e-4]}],
                                    "fixed": {"train.epochs": 2}}))
    sw = sweeps.load_sweep(path, BASE)
    assert sw.trials() == [{"train.epochs": 2, "train.lr": 1e-4}, {"train.epochs": 2, "train.lr": 3e-4}]


def test_the_arch_sweep_puts_both_architectures_in_rows_with_the_same_parameter_names(tmp_path):
    demo = load_config(REPO / "configs/demo.yaml")
    sw = sweeps.load_sweep(REPO / "configs/sweeps/arch.yaml", demo)
    trials = sw.trials()
    assert [t["model.arch"] for t in trials] == ["rsrefseg", "rsrefseg2"]
    configs = [demo.replace(t) for t in trials]
    assert set(configs[0].flat()) == set(configs[1].flat())  # MLflow's compare view lines them up
    rows = sweeps.table_rows(sw, [sweeps.TrialResult(setting=t, status="finished", metrics={"gIoU": g})
                                  for t, g in zip(trials, (60.0, 70.0))])
    assert [(r["setting"], r["gIoU"]) for r in rows] == [("architecture=RSRefSeg", 60.0), ("architecture=RSRefSeg-2", 70.0)]
    # At real sizes each value brings its own preset and weights (`also:`), as the file shows.
    path = tmp_path / "arch-l.yaml"
    path.write_text(yaml.safe_dump({"mode": "grid", "axes": [{
        "key": "model.arch", "values": ["rsrefseg", "rsrefseg2"],
        "also": [{}, {"model.preset": "rsrefseg2-l", "model.sam_checkpoint": "weights/sam2.1_hiera_large.pt",
                      "model.siglip_path": "weights/siglip2-so400m-patch16-512", "data.label_size": 0}]}]}))
    real = sweeps.load_sweep(path, BASE)
    second = real.trials()[1]
    assert second["model.preset"] == "rsrefseg2-l" and BASE.replace(second).model.arch == "rsrefseg2"
    assert real.trials()[0] == {"model.arch": "rsrefseg"}
    # Without the `also`, the real recipe's preset does not fit the other architecture: refused.
    with pytest.raises(ConfigError, match="model.preset: rsrefseg-b is a preset of the rsrefseg"):
        sweeps.load_sweep(REPO / "configs/sweeps/arch.yaml", BASE)


def test_the_rsrefseg2_ablation_varies_its_own_axes_one_at_a_time():
    base = load_config(REPO / "configs/rsrefseg2-l-rrsisd.yaml")
    sw = sweeps.load_sweep(REPO / "configs/sweeps/ablation-rsrefseg2.yaml", base)
    trials = sw.trials()
    assert len(trials) == 8
    keys = {k for t in trials for k in t}
    assert {"model.rsrefseg2.contrastive_weight", "model.rsrefseg2.stage1_blocks",
            "model.rsrefseg2.prompt_tokens"} <= keys


@pytest.mark.parametrize(
    "axes, match",
    [
        ([{"key": "model.lora.sam_rnk", "values": [8]}], "not a config key"),
        ([{"key": "model.prompter.downsample_rate", "values": [2, 3, 4]}], "downsample_rate"),
        ([{"key": "model.lora.sam_rank", "values": [8, 32]}], "default 16 is not one of"),
        ([{"key": "model.lora.sam_rank", "values": [8, 16], "labels": ["a"]}], "labels"),
        ([], "at least one axis"),
    ],
)
def test_bad_sweeps_fail_with_a_clear_message(tmp_path, axes, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"mode": "one_at_a_time", "axes": axes}))
    with pytest.raises(ConfigError, match=match):
        sweeps.load_sweep(path, BASE)


def test_table_has_every_row_and_marks_failures():
    sw = sweeps.load_sweep(REPO / "configs/sweeps/ablation.yaml", BASE)
    results = []
    for i, setting in enumerate(sw.trials()):
        if setting["model.lora.sam_rank"] == 8:
            results.append(sweeps.TrialResult(setting=setting, status="failed", error="boom"))
        else:
            metrics = {c: float(i) for c in METRIC_NAMES}
            results.append(sweeps.TrialResult(setting=setting, status="finished", metrics=metrics, best_epoch=1))
    rows = sweeps.table_rows(sw, results)
    assert [(r["axis"], r["setting"]) for r in rows][:3] == [
        ("SAM LoRA rank", "8"), ("SAM LoRA rank", "16"), ("SAM LoRA rank", "32")]
    assert len(rows) == 3 + 3 + 3 + 2
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["axis"], r["setting"]) for r in failed] == [("SAM LoRA rank", "8")]
    assert failed[0]["gIoU"] is None
    # The default setting fills one row on every axis, from the same trial.
    default_rows = [r for r in rows if (r["axis"], r["setting"]) in {
        ("SAM LoRA rank", "16"), ("text encoder tuned", "full"), ("prompter downsampling", "4"), ("dense prompt", "with")}]
    assert len({r["gIoU"] for r in default_rows}) == 1
    md = sweeps.to_markdown(rows)
    assert "failed" in md and "| SAM LoRA rank | 8 |" in md
    assert sweeps.to_csv(rows).splitlines()[0].startswith("axis,setting,Pr@0.5")


def test_grid_table_follows_the_sweep_order_not_the_finishing_order(tmp_path):
    path = tmp_path / "ranks.yaml"
    path.write_text(yaml.safe_dump({"mode": "grid", "axes": [
        {"name": "SAM LoRA rank", "key": "model.lora.sam_rank", "values": [4, 8, 16]}]}))
    sw = sweeps.load_sweep(path, BASE)
    metrics = {c: 1.0 for c in METRIC_NAMES}
    # Finished last-first (as after a resume), and one trial has no result yet.
    results = [sweeps.TrialResult(setting=s, status="finished", metrics=metrics, best_epoch=1)
               for s in reversed(sw.trials()[1:])]
    rows = sweeps.table_rows(sw, results)
    assert [r["setting"] for r in rows] == ["SAM LoRA rank=4", "SAM LoRA rank=8", "SAM LoRA rank=16"]
    assert [r["status"] for r in rows] == ["pending", "finished", "finished"]


def test_trial_runs_are_named_by_what_they_vary():
    sweep = sweeps.load_sweep(REPO / "configs/sweeps/ablation.yaml", BASE)
    names = [sweep.run_name(s) for s in sweep.trials()]
    assert names == ["sam_rank=8", "default", "sam_rank=32", "siglip_text_layers=zero", "siglip_text_layers=half",
                     "downsample_rate=2", "downsample_rate=8", "dense_prompt=false"]


def test_trials_take_the_train_sections_resources_unless_tune_sets_them():
    from rsrefseg.jobs.tune import trial_config

    trial = trial_config(BASE, {"model.lora.sam_rank": 8}).train  # a GPU recipe, nothing repeated
    assert (trial.use_gpu, trial.gpus_per_worker, trial.cpus_per_worker, trial.num_workers) == (
        True, BASE.train.gpus_per_worker, BASE.train.cpus_per_worker, BASE.train.num_workers)
    shared = trial_config(BASE.replace(["tune.gpus_per_worker=0.5", "tune.cpus_per_worker=2", "tune.num_workers=1"]), {})
    assert (shared.train.gpus_per_worker, shared.train.cpus_per_worker, shared.train.num_workers) == (0.5, 2, 1)
    on_cpu = trial_config(BASE.replace(["tune.gpus_per_worker=0", "train.precision=fp32"]), {}).train
    assert not on_cpu.use_gpu


def test_a_sweep_varies_a_mixture_s_weights(tmp_path):
    mixed = load_config(REPO / "configs/demo-mixed.yaml")
    path = tmp_path / "weights.yaml"
    path.write_text(yaml.safe_dump({"mode": "grid", "axes": [
        {"key": "data.sources.synth_b.weight", "values": [0.5, 1.0, 4.0]}]}))
    trials = sweeps.load_sweep(path, mixed).trials()
    assert [t["data.sources.synth_b.weight"] for t in trials] == [0.5, 1.0, 4.0]
    cfg = mixed.replace(trials[-1])
    assert [(s.name, s.weight) for s in cfg.data.source_list()] == [("synth_a", 1.0), ("synth_b", 4.0)]
    path.write_text(yaml.safe_dump({"mode": "grid", "axes": [
        {"key": "data.sources.synth_b.weight", "values": [1.0, 0]}]}))
    with pytest.raises(ConfigError, match="data.sources.synth_b.weight"):
        sweeps.load_sweep(path, mixed)
