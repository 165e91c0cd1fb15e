"""Decoding a prepare's samples as Ray tasks on a cluster's nodes (`rsrefseg prepare --ray-address`).

Only the decoding moves: the driver still reads the metadata, orders the rows, writes the shards
and the manifest and journals for resume (`prepare`), so the dataset it publishes is the one a
prepare with local threads publishes, byte for byte. `ClusterPool.submit(fn, item)` returns a
`concurrent.futures.Future`, as a thread pool's does, so `prepare.bounded_map` drives either.
Behind it, samples go out in tasks of ITEMS_PER_TASK (a task per sample would cost more in
scheduling than a small image takes to decode), each task taking one CPU, and at most `window`
samples are in flight: the driver's memory stays flat in the dataset's size, as with threads.

The tasks open the source at the path the driver reads it from, so every node that runs them
must see that folder there (a shared mount: NFS, a cloud bucket mounted with s3fs/gcsfuse, ...).
`check_source_visible` asks every node with CPUs before anything is decoded or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .triplet import DatasetError

log = logging.getLogger(__name__)

# Samples per task: a few tens of milliseconds of decoding each for a 512 px image, well above a
# task's scheduling cost, and small enough that the last tasks of a pass end together.
ITEMS_PER_TASK = 8
# Tasks in flight per CPU of the cluster (one running, one queued behind it so no CPU waits on
# the driver), capped: every sample in flight may be held by the driver once decoded (~1 MB for
# a 512 px raw image), so the cap bounds the driver's memory whatever the cluster's size.
TASKS_PER_CPU = 2
MAX_TASKS_IN_FLIGHT = 64
ANSWER_TIMEOUT_S = 120  # for a node's answer to the source check (a task with no CPU to wait for)


class SourceNotVisible(DatasetError):
    """A node of the cluster cannot see the dataset's source at the driver's path."""


@contextlib.contextmanager
def joined(address: str) -> Iterator[None]:
    """Join the Ray cluster at `address` (what `ray.init(address=...)` takes) for the block, and
    leave it afterwards. A process already connected to Ray (a Ray job, tests) keeps its
    connection, whatever `address` says, and stays connected after the block."""
    import ray

    from rsrefseg.platform.config import RAY_LOGIN, ClusterConfig
    from rsrefseg.platform.ray_session import init_ray

    try:  # checked even where the connection is kept: a login in it is refused either way
        cluster = ClusterConfig(address=address)
    except ValueError as exc:  # pydantic's ValidationError: credentials in the address
        # Not echoed: what is wrong with it may be a password in it.
        raise DatasetError(f"--ray-address: {_first_error(exc)}") from None
    if ray.is_initialized():
        log.info("decoding on the Ray this process is already connected to (not joining %s)", address)
        yield
        return
    # The tasks run this driver's code (`prepare._pixel_check`, `_encode`), shipped with the
    # connection as `rsrefseg submit` ships a job's: the nodes need Ray and the dependencies only.
    code = {"py_modules": [str(Path(__file__).resolve().parents[1])], "excludes": ["**/__pycache__"]}
    try:
        init_ray(cluster, runtime_env=code)
    except ConnectionError as exc:
        raise DatasetError(f"--ray-address {address}: could not join a Ray cluster there ({exc}); is Ray "
                           f"running there, and does this machine have the cluster's token? {RAY_LOGIN}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    return errors()[0]["msg"] if callable(errors) else str(exc)


def check_source_visible(root: Path) -> None:
    """Fail, naming the node and the path, when a node with CPUs (one decoding tasks may run on)
    cannot list `root` or lists other files there than this machine does (a node-local copy
    that differs). Nothing is checked where this machine cannot list `root` either: the reader
    then says what is wrong with it, as without a cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = _source_state(str(root))
    if not here.startswith("files "):
        return
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()
             if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0}
    if not nodes:  # an autoscaling cluster before its workers are up: each task checks on its node
        log.warning("no node of the Ray cluster has CPUs yet: %s is checked by each decoding task instead", root)
        return
    look = ray.remote(num_cpus=0, max_retries=0)(_look)
    refs = {node: look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(root))
            for node in nodes}
    problems = []
    for node, ref in refs.items():
        try:
            seen = ray.get(ref, timeout=ANSWER_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            seen = f"the node did not answer within {ANSWER_TIMEOUT_S} s"
        except ray.exceptions.RayError as exc:  # the task failed there: its own error, not Ray's traceback
            seen = f"the check failed there: {_cause(exc)}"
        if seen != here:
            name = f"node {nodes[node]} ({node[:8]})"
            problems.append(f"{name} sees other files at {root} than this machine" if seen.startswith("files ")
                            else f"{name} cannot see {root}: {seen}")
    if problems:
        raise SourceNotVisible(
            "--ray-address: the decoding tasks read the source where the driver reads it, but "
            + "; ".join(problems) + ". Mount the dataset at the same path on every node (a shared "
            "filesystem), or prepare without --ray-address on a machine that has it; nothing was written"
        )
    log.info("every node of the cluster with CPUs (%d) sees %s", len(nodes), root)


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(exc).splitlines()[0]


def _look(root: str) -> str:
    """Run on a node: what it sees at `root` (`_source_state`, looked up in the node's own copy
    of this module when the task runs, not shipped from the driver)."""
    return _source_state(root)


def _source_state(root: str) -> str:
    """"files <digest>" of the names of the entries directly under `root` and the sizes of its
    files (the same on every node that sees the same folder, whatever the filesystem gives a
    folder's own size), else why it cannot be listed."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        listing = [f"{e.name}\t{e.stat().st_size if e.is_file() else '-'}" for e in entries]
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return "files " + hashlib.sha256("\n".join(listing).encode("utf-8", "surrogateescape")).hexdigest()


class _Result(Future):
    """One sample's result. Waiting on it first sends its task if that is still being filled
    (the last, partial batch of a pass), so a caller may wait on any result it was given."""

    def __init__(self, pool: "ClusterPool"):
        super().__init__()
        self.pool, self.sent = pool, False

    def result(self, timeout: Optional[float] = None) -> Any:
        if not self.sent:
            self.pool.send()
        return super().result(timeout)


class ClusterPool(Executor):
    """Decodes samples in Ray tasks (`submit`, like an executor's); `window`: how many samples a
    caller should keep in flight. `ran_on`: the (node id, pid) of every task that ran, which
    says where the work went. Use it in a `with` block: leaving it cancels what is in flight."""

    def __init__(self, root: Path, *, items_per_task: int = ITEMS_PER_TASK, tasks_in_flight: Optional[int] = None):
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        tasks = tasks_in_flight or max(1, min(MAX_TASKS_IN_FLIGHT, TASKS_PER_CPU * cpus))
        self.root, self.items_per_task, self.window = str(root), items_per_task, items_per_task * tasks
        self.ran_on: set[tuple[str, int]] = set()
        self.tasks = 0
        self._remote = ray.remote(num_cpus=1)(_decode_batch)
        self._fn: Optional[Callable] = None
        self._open: list[tuple[Any, _Result]] = []  # the batch being filled
        self._in_flight: dict[Any, None] = {}
        self._lock = threading.Lock()

    def submit(self, fn: Callable, item: Any) -> Future:  # type: ignore[override]  # one sample a call
        if self._fn is not fn:
            self.send()  # a task runs one function
            self._fn = fn
        future = _Result(self)
        self._open.append((item, future))
        if len(self._open) >= self.items_per_task:
            self.send()
        return future

    def send(self) -> None:
        """Start the task of the batch being filled (nothing when it is empty)."""
        batch, self._open = self._open, []
        if not batch:
            return
        for _, future in batch:
            future.sent = True
        ref = self._remote.remote(self._fn, [item for item, _ in batch], self.root)
        with self._lock:
            self._in_flight[ref] = None
        self.tasks += 1
        ref.future().add_done_callback(lambda done: self._deliver(ref, done, [f for _, f in batch]))

    def _deliver(self, ref: Any, done: Future, futures: list[_Result]) -> None:
        """Hand a finished task's results to its samples' futures (in Ray's thread)."""
        with self._lock:
            self._in_flight.pop(ref, None)
        try:
            node, pid, outcomes = done.result()
        except BaseException as exc:  # the task failed as a whole: every sample of it says why
            cause = getattr(exc, "cause", None)
            for future in futures:
                future.set_exception(cause if isinstance(cause, Exception) else exc)
            return
        with self._lock:
            self.ran_on.add((node, pid))
        for future, (ok, value) in zip(futures, outcomes):
            future.set_result(value) if ok else future.set_exception(value)

    def __enter__(self) -> "ClusterPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancel what is still in flight (after an error or an interrupt: the rest of the pass
        is not wanted; after a whole pass nothing is)."""
        import ray

        self._open = []
        with self._lock:
            left = list(self._in_flight)
        for ref in left:
            ray.cancel(ref)
        log.debug("decoded in %d task(s) by %d worker process(es) on %d node(s)", self.tasks, len(self.ran_on),
                  len({node for node, _ in self.ran_on}))


def _decode_batch(fn: Callable, items: list, root: str) -> tuple[str, int, list[tuple[bool, Any]]]:
    """Run on a node: `fn` of every item, in order, each outcome (ok, result or exception) on its
    own so that a failing sample fails where it would with threads; and who ran it. A source
    gone from the node (a mount lost mid-run) fails the task: its samples would otherwise all be
    reported missing, and with --skip-invalid silently left out."""
    import ray

    if not os.path.isdir(root):
        where = f"node {ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"
        raise SourceNotVisible(f"--ray-address: {where} cannot see the source {root} any more (it did when "
                               "prepare began); nothing was published")
    outcomes: list[tuple[bool, Any]] = []
    for item in items:
        try:
            outcomes.append((True, fn(item)))
        except Exception as exc:
            outcomes.append((False, exc))
    return ray.get_runtime_context().get_node_id(), os.getpid(), outcomes
