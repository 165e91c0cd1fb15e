"""DeepSpeed's CPU communication op: built once, with one ninja.

On the CPU accelerator, DeepSpeed compiles a small C++ op (its shared-memory all-reduce) when a
process group first starts, with the `ninja` it finds on PATH, into the torch extensions cache
(~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR). Two things made that costly:
- there are two ninjas: the venv's (a dependency of deepspeed) and, often, the system's. They keep
  build logs that do not agree, so a process that finds the other one compiles again (about 40 s
  on 2 cores, while every worker of the job waits), then the next one compiles back;
- `.venv/bin/rsrefseg` run without activating the venv on a machine with no system ninja finds
  none, and the build fails.
So every process that may build it uses the ninja beside its own Python, and `make install` builds
it once (`python -m rsrefseg.training.native_ops`): DeepSpeed's own advice is to pre-build ops
rather than compile them on first use. GPU accelerators need no such op; nothing is built there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def use_venv_tools() -> None:
    """Put the folder of this Python's scripts (ninja among them) first on PATH, if it holds ninja."""
    bindir = str(Path(sys.executable).parent)
    if not (Path(bindir) / "ninja").exists():
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path if path else bindir


def build_cpu_comm_op() -> bool:
    """Build (or find built) DeepSpeed's op for the CPU accelerator; False where none is needed."""
    use_venv_tools()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return False
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        return False
    builder.load(verbose=False)
    return True


if __name__ == "__main__":
    built = build_cpu_comm_op()
    from rsrefseg.platform.console import say

    say("DeepSpeed CPU communication op: " + ("built" if built else "not needed on this accelerator"))
