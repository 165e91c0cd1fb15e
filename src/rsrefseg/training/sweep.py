"""Sweep files and the ablation table (pure logic; `tune.py` runs it on Ray Tune).

A sweep file names axes, each a config key and its settings, and a mode:

    mode: one_at_a_time      # the paper's ablation: vary one axis from the default at a time
    axes:
      - name: SAM LoRA rank
        key: model.lora.sam_rank
        values: [8, 16, 32]
        default: 16           # one_at_a_time: the setting the other rows hold fixed
      - name: dense prompt
        key: model.prompter.dense_prompt
        values: [false, true]
        labels: [without, with]
        default: true

`mode: grid` runs the full cross product instead. Any config key can be an axis. In
one_at_a_time mode the shared default setting is one trial, not one per axis. An axis may set
other keys with each value (`also:`, one mapping per value): the preset and weight files that
go with each `model.arch`, say (configs/sweeps/arch.yaml).
"""

from __future__ import annotations

import csv
import io
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from rsrefseg.platform.config import Config, read_yaml
from rsrefseg.platform.errors import ConfigError
from rsrefseg.platform.metric_names import METRIC_NAMES
from rsrefseg.platform.recipes import find_recipe



@dataclass(frozen=True)
class Axis:
    name: str
    key: str
    values: tuple
    labels: tuple
    default: Any = None
    # Per value, other keys set together with it (`also:`), e.g. the preset and weight files
    # that go with each model.arch; empty mappings when the axis has none.
    also: tuple = ()

    def label(self, value: Any) -> str:
        return self.labels[self.values.index(value)]

    def also_for(self, value: Any) -> dict[str, Any]:
        return dict(self.also[self.values.index(value)]) if self.also else {}


@dataclass
class Sweep:
    mode: str
    axes: list[Axis]
    source: str = "sweep"
    fixed: dict[str, Any] = field(default_factory=dict)

    def trials(self) -> list[dict[str, Any]]:
        """The distinct settings to run, each a dict of dotted overrides (fixed keys included)."""
        if self.mode == "grid":
            combos = itertools.product(*[a.values for a in self.axes])
            settings = [dict(zip([a.key for a in self.axes], combo)) for combo in combos]
        else:
            default = {a.key: a.default for a in self.axes}
            settings = []
            for axis in self.axes:
                for value in axis.values:
                    setting = {**default, axis.key: value}
                    if setting not in settings:
                        settings.append(setting)
        return [self.complete(s) for s in settings]

    def complete(self, setting: dict[str, Any]) -> dict[str, Any]:
        """A setting of the axis keys with the fixed keys and each value's `also` keys added."""
        out = dict(self.fixed)
        for axis in self.axes:
            out.update(axis.also_for(setting[axis.key]))
        return {**out, **setting}

    def trial_label(self, setting: dict[str, Any]) -> str:
        return ", ".join(f"{a.name}={a.label(setting[a.key])}" for a in self.axes)

    def run_name(self, setting: dict[str, Any]) -> str:
        """A trial's MLflow run name: what it varies, each key by its last part (`sam_rank=8`,
        `siglip_text_layers=zero, dense_prompt=false`). one_at_a_time: the axes off their default
        ("default" for the shared default trial); grid: every axis."""
        varied = [a for a in self.axes if self.mode == "grid" or setting[a.key] != a.default]
        return ", ".join(f"{a.key.rsplit('.', 1)[-1]}={_plain(setting[a.key])}" for a in varied) or "default"


def load_sweep(path: str | Path, base: Config) -> Sweep:
    """Read and check a sweep file; every trial's config is validated against `base` here."""
    path = find_recipe(str(path), kind="sweep")  # a file, else a shipped sweep's name
    data = read_yaml(path, what="a mapping (mode, axes, fixed)")
    unknown = set(data) - {"mode", "axes", "fixed"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: mode, axes, fixed)")
    mode = data.get("mode", "one_at_a_time")
    if mode not in ("one_at_a_time", "grid"):
        raise ConfigError(f"{path}: mode must be one_at_a_time or grid, got {mode!r}")
    raw_axes = data.get("axes") or []
    if not raw_axes:
        raise ConfigError(f"{path}: axes: at least one axis is needed")
    flat_base = base.flat()
    axes = []
    for i, raw in enumerate(raw_axes):
        where = f"{path}: axes[{i}]"
        if not isinstance(raw, dict) or "key" not in raw or not raw.get("values"):
            raise ConfigError(f"{where}: needs key and a non-empty values list")
        key = raw["key"]
        if key not in flat_base:
            raise ConfigError(f"{where}: {key}: not a config key")
        values = tuple(raw["values"])
        labels = tuple(str(v) for v in raw.get("labels", values))
        if len(labels) != len(values):
            raise ConfigError(f"{where}: labels and values differ in length")
        default = raw.get("default", flat_base[key])
        if mode == "one_at_a_time" and default not in values:
            raise ConfigError(f"{where}: default {default!r} is not one of the values {list(values)}")
        also = tuple(raw.get("also") or ())
        if also and (len(also) != len(values) or not all(isinstance(a, dict) for a in also)):
            raise ConfigError(f"{where}: also: one mapping of keys per value ({len(values)}), e.g. {{}} for none")
        axes.append(Axis(name=str(raw.get("name", key)), key=key, values=values, labels=labels, default=default,
                         also=also))
    fixed = data.get("fixed") or {}
    sweep = Sweep(mode=mode, axes=axes, source=str(path), fixed=dict(fixed))
    for setting in sweep.trials():
        try:
            base.replace(setting)
        except ConfigError as exc:
            raise ConfigError(f"{path}: trial {sweep.trial_label(setting)}: {exc}") from exc
    return sweep


# --------------------------------------------------------------------------------------------
# The ablation table


@dataclass
class TrialResult:
    setting: dict[str, Any]
    status: str  # finished | failed | stopped (early, by ASHA) | interrupted (resume continues it) | pending
    metrics: dict[str, float] = field(default_factory=dict)  # best epoch's val metrics
    best_epoch: int | None = None
    error: str = ""
    trial_id: str = ""


def table_rows(sweep: Sweep, results: list[TrialResult]) -> list[dict[str, Any]]:
    """Rows in the paper's layout: one per (axis, setting); in grid mode one per trial."""
    by_setting = {_key(r.setting): r for r in results}
    rows = []
    if sweep.mode == "grid":
        # In the sweep's own order, whatever order Tune finished (or resumed) the trials in.
        for setting in sweep.trials():
            r = by_setting.get(_key(setting), TrialResult(setting=setting, status="pending"))
            rows.append(_row("grid", sweep.trial_label(setting), r))
        return rows
    default = {a.key: a.default for a in sweep.axes}
    for axis in sweep.axes:
        for value in axis.values:
            setting = sweep.complete({**default, axis.key: value})
            r = by_setting.get(_key(setting), TrialResult(setting=setting, status="pending"))
            rows.append(_row(axis.name, axis.label(value), r))
    return rows


def _row(axis: str, setting: str, r: TrialResult) -> dict[str, Any]:
    row: dict[str, Any] = {"axis": axis, "setting": setting}
    # A trial ASHA stopped early keeps the figures of the epochs it ran (marked "stopped").
    trained = r.status in ("finished", "stopped")
    for col in METRIC_NAMES:
        row[col] = r.metrics.get(col) if trained else None
    row["best epoch"] = r.best_epoch if trained else None
    row["status"] = r.status
    return row


def _key(setting: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in setting.items()))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def ablation_figure(rows: list[dict[str, Any]]):
    """One panel per axis: gIoU per setting (failed settings drawn as an empty, labelled slot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = list(dict.fromkeys(r["axis"] for r in rows))
    fig, panels = plt.subplots(1, len(axes_names), figsize=(3.2 * len(axes_names), 3), squeeze=False)
    for panel, name in zip(panels[0], axes_names):
        sub = [r for r in rows if r["axis"] == name]
        labels = [r["setting"] if r["status"] == "finished" else f"{r['setting']}\n({r['status']})" for r in sub]
        values = [r["gIoU"] or 0.0 for r in sub]
        panel.bar(range(len(sub)), values, color="tab:blue")
        panel.set_xticks(range(len(sub)), labels, fontsize=7, rotation=30 if len(sub) > 4 else 0)
        panel.set_title(name, fontsize=9)
        panel.set_ylabel("val gIoU (%)", fontsize=8)
    fig.tight_layout()
    return fig


def _plain(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
