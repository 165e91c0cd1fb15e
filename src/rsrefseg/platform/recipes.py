"""The recipes the package ships, found by file path or by name.

The recipes (`configs/*.yaml`) and the sweep files (`configs/sweeps/*.yaml`) live inside the
package (src/rsrefseg/configs; a checkout's top-level `configs` links to it), so an installed
wheel carries them and `rsrefseg demo`, `rsrefseg train --config demo` or
`rsrefseg tune --sweep ablation` work from any folder.

A `--config`/`--sweep` value is, in this order:
  1. an existing file, as given: relative to the working directory, then to the project root
     (`paths.project_root()`: $RSREFSEG_HOME, else the working directory);
  2. a shipped one, by name: `demo`, `demo.yaml`, `configs/demo.yaml`; for sweeps `ablation`,
     `sweeps/ablation`, `configs/sweeps/ablation.yaml`;
  3. else a ConfigError that names the value and lists the shipped names.
"""

from __future__ import annotations

from pathlib import Path

from rsrefseg.platform import paths
from rsrefseg.platform.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "configs"
FOLDERS = {"recipe": SHIPPED, "sweep": SHIPPED / "sweeps"}
# What a name may carry around it: the folders a checkout's paths name, and the suffix.
PREFIXES = {"recipe": ("configs/",), "sweep": ("configs/sweeps/", "sweeps/")}
SUFFIXES = (".yaml", ".yml")
FLAGS = {"recipe": "--config", "sweep": "--sweep"}


def _folder(kind: str) -> Path:
    if kind not in FOLDERS:
        raise ValueError(f"kind must be one of {sorted(FOLDERS)}, got {kind!r}")
    return FOLDERS[kind]


def shipped(kind: str = "recipe") -> list[str]:
    """The names of the shipped recipes (kind="recipe") or sweep files (kind="sweep")."""
    folder = _folder(kind)
    return sorted(p.stem for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file()) if folder.is_dir() else []


def shipped_file(value: str, kind: str = "recipe") -> Path | None:
    """The shipped recipe or sweep file `value` names (`demo`, `demo.yaml`, `configs/demo.yaml`), else None."""
    folder = _folder(kind)
    name = value.strip().replace("\\", "/")
    for prefix in PREFIXES[kind]:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if not name or name not in shipped(kind):  # only a listed name: no other folder is reachable this way
        return None
    return next(folder / f"{name}{s}" for s in SUFFIXES if (folder / f"{name}{s}").is_file())


def find_recipe(value: str, kind: str = "recipe") -> Path:
    """The file `value` names: an existing file (as given, else under the project root), else
    the shipped recipe or sweep of that name; a ConfigError when it is neither."""
    _folder(kind)
    text = str(value)
    given = Path(text).expanduser()
    if text.strip():
        if given.is_file():
            return given
        under_root = paths.project_root() / given
        if not given.is_absolute() and under_root.is_file():
            return under_root
        found = shipped_file(text, kind)
        if found is not None:
            return found
    names = ", ".join(shipped(kind)) or "none"
    places = " or ".join(dict.fromkeys(str(p) for p in (Path.cwd(), paths.project_root())))
    raise ConfigError(f"{FLAGS[kind]} {text}: not found: no such file in {places}, "
                      f"nor the name of a shipped {kind} (shipped: {names})")
