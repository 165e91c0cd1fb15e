"""The platform's one console voice, and where everything else a command's libraries say goes.

`say("epoch 1/3 ...")` prints `[rsrefseg] epoch 1/3 ...` to stdout, flushed: the platform's
progress and results. It writes to `sys.stdout` directly, not through `print`: inside a Ray Train
worker `print` is patched to go through Train's logger (and to stdout when stdout is wrapped), so
a printed line would show up twice in the job log. A worker's stdout reaches the driver's console
through Ray's log_to_driver.

`setup(command, verbose)` (the CLI calls it once per command) owns logging:
- the console (stderr) shows the platform's own log records (`rsrefseg.*`, INFO and up) and every
  library's warnings and errors;
- everything at INFO and up, the libraries' chatter included (Ray Data's execution notices, Ray
  Train's per-rank reports, MLflow's), goes to the command's log file,
  `<project>/logs/<command>-<date>-<time>-<pid>.log` (the project folder is $RSREFSEG_HOME, else
  the working directory; always a local file, also when the run folder is s3://). The file is
  written once `name_log` names it (init_ray does, when Ray starts), from the command's first
  record on; a command that never names it (prepare, submit, ...) leaves no file;
- `verbose=True` (`--verbose`) puts that chatter back on the console as well.
Lines Ray forwards from its worker processes are sorted the same way by `worker_lines`, which
`ray_session.init_ray` hooks into Ray's log_to_driver.

A process that configured logging before (pytest, an application that embeds the CLI) keeps its
own setup: `setup` then changes nothing and returns None, as `logging.basicConfig` would.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

PREFIX = "[rsrefseg] "
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Loggers that libraries give console handlers of their own (and cut off from the root logger):
# their records are sent through the root logger's handlers instead, which sort them.
ADOPTED = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "sqlalchemy.engine", "huey")
# Chatter that not even the log file needs (MLflow sets these itself when it configures logging).
QUIET = ("botocore", "alembic", "sqlalchemy.engine", "huey")

# A forwarded worker line that is a warning or an error: it stays on the console.
_ALARM = re.compile(r"\b(?:WARNING|WARN|ERROR|CRITICAL|FATAL)\b|\w*(?:Error|Exception|Warning)\b")
_TRACEBACK = "Traceback (most recent call last)"
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Pending(logging.Handler):
    """The records (INFO and up, the last 10,000) before the log file is named: its first lines."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=10_000)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _State:
    active = False  # setup installed the handlers below
    verbose = True  # until setup says otherwise, nothing is held back
    path: Path | None = None
    named = False
    command = ""
    console: logging.Handler | None = None
    file: logging.Handler | None = None
    pending: _Pending | None = None  # the records before the file is named


_state = _State()


def say(message: str) -> None:
    """One `[rsrefseg] message` line on stdout (the prefix is not doubled if already there)."""
    line = message if message.startswith(PREFIX) else PREFIX + message
    sys.stdout.write(line.rstrip("\n") + "\n")
    sys.stdout.flush()


class _Stderr(logging.StreamHandler):
    """The console: whatever sys.stderr is when a record comes (pytest and the like replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _for_console(record: logging.LogRecord) -> bool:
    if record.levelno < logging.INFO:  # Ray Data's logger passes on DEBUG records (for its own files)
        return False
    if getattr(record, "hide", False):  # Ray Data marks records meant for its log files only
        return _state.verbose
    return _state.verbose or record.levelno >= logging.WARNING or record.name.partition(".")[0] == "rsrefseg"


def setup(command: str, verbose: bool = False, *, log_dir: str | Path | None = None) -> Path | None:
    """Route logging for one command: returns its log file, written once `name_log` names it
    (None where this process's logging was configured by its host, which is then left alone).
    `log_dir`: the folder of the log file (default `<project>/logs`). Calling it again replaces
    what it set up before."""
    close()
    root = logging.getLogger()
    if root.handlers:
        return None
    _state.active, _state.verbose, _state.command = True, verbose, command
    root.setLevel(logging.INFO)
    _state.console = _Stderr()
    _state.console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    _state.console.addFilter(_for_console)
    root.addHandler(_state.console)
    # MLflow would give its loggers a console handler of their own when imported (later, by a job).
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in QUIET:
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    adopt()
    _state.path = _open_log(command, log_dir)
    if _state.path is None:
        _state.verbose = True  # nowhere to keep what the console would not show: show it
    return _state.path


class _Plain(logging.Formatter):
    """The log file's format, without the terminal's colour codes."""

    def format(self, record: logging.LogRecord) -> str:
        return _ESCAPES.sub("", super().format(record))


class _LogFile(logging.FileHandler):
    """The log file, created (with its folder) by the first record: a command that has nothing
    to log leaves no file behind."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _writable(folder: Path) -> bool:
    """True where `folder` is, or can be created, writable (nothing is created to find out)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def _open_log(command: str, log_dir: str | Path | None) -> Path | None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', command)}-{stamp}-{os.getpid()}.log"
    home = Path(os.environ.get("RSREFSEG_HOME") or os.getcwd()).expanduser()
    folders = [Path(log_dir)] if log_dir else [home / "logs", Path(tempfile.gettempdir()) / "rsrefseg-logs"]
    for folder in folders:
        if _writable(folder):
            path = folder.resolve() / name
            _state.file = _LogFile(path)
            _state.file.setLevel(logging.INFO)
            _state.file.setFormatter(_Plain(FILE_FORMAT))
            _state.pending = _Pending()
            logging.getLogger().addHandler(_state.pending)
            return path
        logging.getLogger(__name__).warning("cannot write a log file in %s", folder)
    return None


def close() -> None:
    """Undo setup: remove its handlers and close the log file (setup calls it first)."""
    root = logging.getLogger()
    for handler in (_state.console, _state.pending, _state.file):
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
    _state.active, _state.verbose, _state.path, _state.named = False, True, None, False
    _state.console = _state.pending = _state.file = None


def adopt(*names: str) -> None:
    """Send the records of these loggers (default: ADOPTED) through setup's handlers: drop the
    console handlers their libraries gave them, and let them reach the root logger. Their own
    file handlers (Ray's session logs) stay. Call it again after importing such a library."""
    if not _state.active:
        return
    for name in names or ADOPTED:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def verbose() -> bool:
    """True where the libraries' chatter is shown on the console (`--verbose`, or no setup)."""
    return _state.verbose


def active() -> bool:
    """True where setup routes this command's output (False where the host process owns logging)."""
    return _state.active


def name_log() -> Path | None:
    """Say where the log file is (once per command; it exists from then on): call it where the
    libraries' chatter starts going there, e.g. when Ray starts."""
    if _state.path is not None and not _state.named:
        _state.named = True
        root = logging.getLogger()
        _state.file.handle(logging.LogRecord(__name__, logging.INFO, "", 0, "rsrefseg %s (pid %d)",
                                             (_state.command, os.getpid()), None))
        root.removeHandler(_state.pending)
        for record in _state.pending.records:
            _state.file.handle(record)
        _state.pending = None
        root.addHandler(_state.file)
        say(f"log: {_state.path}" + ("" if _state.verbose else " (Ray's own output; --verbose shows it here too)"))
    return _state.path


def worker_lines(lines: list[str], source: str = "") -> list[str]:
    """Lines Ray forwarded from a worker process (`source` names it): all go to the log file; the
    ones returned are for the console: the platform's own lines, warnings and errors (with a
    traceback's remaining lines), or every line with --verbose."""
    log = _state.pending or (_state.file if _state.named else None)
    if log is not None:
        for line in lines:
            log.handle(logging.LogRecord("ray.worker", logging.INFO, "", 0, "(%s) %s", (source, line), None))
    if _state.verbose:
        return list(lines)
    kept, traceback = [], False
    for line in lines:
        traceback = traceback or _TRACEBACK in line
        if traceback or PREFIX.strip() in line or _ALARM.search(line):
            kept.append(line)
    return kept


# -- progress ---------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """`H:MM:SS`, what an ETA reads as (training's progress lines and the progress bar)."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{seconds:02d}"


def bar_text(label: str, done: int, total: int, elapsed: float, *, unit: str = "samples", width: int = 24) -> str:
    """`label [#########...............] 1234/4000 310.2 samples/s ETA 0:00:08`: the rate is
    over the `elapsed` seconds so far, the ETA the rest at that rate ("?" before the first)."""
    share = done / total if total else 1.0
    filled = int(width * min(1.0, share))
    rate = done / elapsed if done and elapsed > 0 else 0.0
    eta = duration((total - done) / rate) if rate else "?"
    return f"{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:.1f} {unit}/s ETA {eta}"


class ProgressBar:
    """One line on stderr, redrawn in place (at most every `every` seconds) as work is done:
    `bar_text`. Drawn only where stderr is a terminal: a pipe or a log file gets no redraws (and
    the command's result lines, `say`, are on stdout either way); `enabled=False` draws nothing
    anywhere. `close()` (or leaving the `with` block) draws the last state and ends the line."""

    def __init__(self, label: str, total: int, *, unit: str = "samples", enabled: bool = True, every: float = 0.1,
                 clock=time.monotonic):
        self.label, self.total, self.unit, self.every, self.clock = label, total, unit, every, clock
        self.enabled = enabled and _is_terminal(sys.stderr)
        self.done, self.start, self.drawn = 0, clock(), None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and (self.drawn is None or self.clock() - self.drawn >= self.every or self.done >= self.total):
            self._draw()

    def text(self) -> str:
        return bar_text(self.label, self.done, self.total, self.clock() - self.start, unit=self.unit)

    def close(self) -> None:
        if self.enabled and self.drawn is not None:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.enabled = False

    def _draw(self) -> None:
        self.drawn = self.clock()
        sys.stderr.write("\r" + self.text() + "\x1b[K")  # erase what a longer line left
        sys.stderr.flush()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by something without one, or closed
        return False
