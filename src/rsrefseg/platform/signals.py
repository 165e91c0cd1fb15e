"""The one owner of how a stop signal ends a command.

SIGTERM is what `rsrefseg jobs stop`, `ray job stop`, `kill`, a scheduler or a supervisor sends.
A command ends on it as on Ctrl-C, so that whatever it opened (an MLflow run, a sweep) is closed
as interrupted before Ray's grace period ends in SIGKILL. A Tune sweep instead hands it to Tune
as SIGINT, which saves the sweep's state and stops its trials.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _as_sigint(signum, frame) -> None:
    signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def handling(signums: tuple[int, ...], handler: Callable, *, keep_ignored: bool = False) -> Iterator[None]:
    """`handler` for each of `signums` during the block, the previous ones after. Signals reach
    only the main thread: elsewhere (a Tune trial's thread) the block runs as it is.
    `keep_ignored`: a signal ignored when the block starts stays ignored (SIGHUP under nohup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    for signum, before in previous.items():
        if not (keep_ignored and before is signal.SIG_IGN):
            signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before if before is not None else signal.SIG_DFL)


def sigterm_interrupts() -> contextlib.AbstractContextManager:
    """SIGTERM raises KeyboardInterrupt during the block, as Ctrl-C does."""
    return handling((signal.SIGTERM,), _interrupt)


def sigterm_as_sigint() -> contextlib.AbstractContextManager:
    """SIGTERM is delivered as SIGINT during the block (to a loop, such as Tune's, that stops
    cleanly on Ctrl-C but would unwind half-way on a KeyboardInterrupt of ours)."""
    return handling((signal.SIGTERM,), _as_sigint)


def install_sigterm_interrupts() -> None:
    """For the whole command (the CLI): SIGTERM raises KeyboardInterrupt from now on."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
