"""The jobs' console: the job's own lines, one per event, and a progress bar on a terminal.

Everything else a stage's libraries write -- Ray's and Ray Data's loggers, the C++ core worker's
error lines, DeepSpeed's and torch's notices, the output of every Ray worker -- goes to the
stage's log file in the store (``logs/<stage>/<time>-<host>-<pid>-output.log``), not the console:

* :func:`stage_output` points file descriptor 2 of the driver at that file while the stage runs
  (C++ logging writes to the descriptor, not to ``sys.stderr``); the job's own lines go to
  stdout, which stays the console.
* :func:`route_worker_logs` replaces Ray's printer of its workers' output on the driver: lines a
  worker marks with :func:`worker_line` reach the console once, without Ray's prefix; every
  other line goes to stderr, so into the current stage's log file.
* :class:`Progress`: a tqdm bar on stdout when stdout is a terminal; otherwise nothing but the
  plain lines (:meth:`Progress.note`), so a redirected console stays a list of events.
* frame-dist's own warnings (:class:`FrameDistWarning`, the store's ``LeaseWarning``) are one
  line each on the console's stderr (:func:`warnings_to_console` while a stage runs;
  :func:`route_worker_warnings` in a Ray worker, once however many workers warn); every other
  warning goes where the stage's stderr goes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

# Prefix of a worker's line meant for the job's console (see worker_line); stripped on the way.
WORKER_MARK = "[frame-dist] "
WARNING_MARK = "[frame-dist warning] "  # a worker's own warning, for the console's stderr
OUTPUT_SUFFIX = "-output.log"


class FrameDistWarning(RuntimeWarning):
    """A warning of frame-dist's own, for the person at the console: one line on its stderr,
    also while a stage's stderr goes to its log file and from a Ray worker."""


def is_terminal() -> bool:
    """Whether the console (stdout) is a terminal: progress bars there, plain lines otherwise."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- the stage's log

_console_fds: list[int] = []  # the console's stderr while a stage's goes to its log
_last_store: list[Any] = [None]  # the store of the last stage_output: after_stages logs there


def console_error(text: str) -> None:
    """A line for the person at the console's stderr, also while a stage's stderr is logged."""
    _flush_std()
    os.write(_console_fds[-1] if _console_fds else 2, (text + "\n").encode())


@contextlib.contextmanager
def stage_output(stage: str, store: Any | None) -> Iterator[str | None]:
    """Send the driver's descriptor 2 to ``<store>/logs/<stage>/...-output.log`` meanwhile.

    Yields the log's location, or None when there is no store or it cannot take the file (the
    stage then runs with the console as it is). On an S3 store the file is written locally and
    uploaded at the end. An empty log is not kept.
    """
    if store is not None:
        _last_store[0] = store
    target = _open_stage_log(stage, store)
    if target is None:
        with warnings_to_console():
            yield None
        return
    f, local, rel = target
    try:
        _flush_std()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        _console_fds.append(saved)
        try:
            with warnings_to_console():
                yield store.uri(rel) if rel else local
        finally:
            _flush_std()
            _console_fds.remove(saved)
            os.dup2(saved, 2)
            os.close(saved)
    finally:
        f.close()
        _keep_stage_log(store, local, rel)


def after_stages(fn: Callable[[], object], stage: str = "shutdown") -> None:
    """Run ``fn`` (the driver's Ray shutdown, at exit) with descriptor 2 at an output log of
    ``stage`` in the last stage's store: what Ray's processes print while they stop (a GCS that
    could not kill an actor whose worker already left, ...) is not the console's last line."""
    with stage_output(stage, _last_store[0]):
        fn()


def stage_log(stage: str, suffix: str) -> tuple[str, str]:
    """A new log file of ``stage``: (its path in the store, ``logs/<stage>/<time>-<host>-
    <pid><suffix>``, and its fallback in this machine's temporary directory)."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}{suffix}"
    return (f"logs/{stage}/{name}",
            os.path.join(tempfile.gettempdir(), "frame-dist-logs", stage, name))


def _open_stage_log(stage: str, store: Any | None) -> tuple[Any, str, str | None] | None:
    if store is None:
        return None
    rel, temp = stage_log(stage, OUTPUT_SUFFIX)
    remote = store.root.startswith("s3://")
    local = temp if remote else store.path(rel)
    try:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        f = open(local, "ab", buffering=0)  # noqa: SIM115 - closed by stage_output
    except OSError:
        return None
    return f, local, rel if remote else None


def _keep_stage_log(store: Any, local: str, upload_to: str | None) -> None:
    """Drop an empty log; upload a remote store's from its local file."""
    try:
        if os.path.getsize(local) == 0:
            os.remove(local)
            return
        if upload_to is not None:
            with open(local, "rb") as f:
                store.write_bytes_atomic(upload_to, f.read())
            os.remove(local)
    except Exception:  # noqa: BLE001 - the log is a convenience: never fail the stage for it
        pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# --------------------------------------------------------------------------- our warnings


def own_warning(message: Warning | str, category: type[Warning]) -> str | None:
    """The console line of one of frame-dist's own warnings (None: a library's)."""
    from feature_store.lease import LeaseWarning

    if not issubclass(category, (FrameDistWarning, LeaseWarning)):
        return None
    return "warning: " + " ".join(str(message).split())


def _showwarning(emit: Callable[[str], None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that emits our warnings as one line and hands the others to
    the one installed before it."""
    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = own_warning(message, category)
        if text is None:
            previous(message, category, filename, lineno, file, line)
        else:
            emit(text)

    return show


@contextlib.contextmanager
def warnings_to_console() -> Iterator[None]:
    """Meanwhile our warnings are one line on the console's stderr (:func:`console_error`);
    the others go to ``warnings.showwarning`` as before (the stage's log)."""
    previous = warnings.showwarning
    show = warnings.showwarning = _showwarning(console_error)
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = previous


_worker_warnings = [False]  # route_worker_warnings installed in this process


def _marked_line(text: str) -> None:
    sys.stdout.write(f"{WARNING_MARK}{text}\n")
    sys.stdout.flush()


def route_worker_warnings() -> None:
    """In a Ray worker: our warnings as marked lines, which the driver's :func:`_route` puts
    on the console's stderr, once however many workers send the same line."""
    if _worker_warnings[0]:
        return
    _worker_warnings[0] = True
    warnings.showwarning = _showwarning(_marked_line)


# --------------------------------------------------------------------------- Ray workers' output


def worker_line(text: str) -> None:
    """Write one line for the job's console from a Ray worker (routed by the driver).

    Written to stdout directly: Ray Train patches ``print`` in its workers to also send the
    line to its logger, which would print it a second time.
    """
    sys.stdout.write(f"{WORKER_MARK}{text}\n")
    sys.stdout.flush()


_last_worker_output = [0.0]  # monotonic time of the last batch of worker lines
_warned: set[str] = set()  # workers' warning lines already on the console


def route_worker_logs() -> bool:
    """Replace Ray's printer of worker output (``log_to_driver``) with :func:`_route`.

    Ray 2.60's dispatcher is private: when it moved, Ray's own printer stays (returns False).
    """
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not hasattr(ray_worker, "print_to_stdstream") or not hasattr(dispatcher, "handlers"):
        return False
    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", _route)
    return True


def _route(data: dict[str, Any]) -> None:
    from ray._private import worker as ray_worker

    _last_worker_output[0] = time.monotonic()
    lines = data.get("lines") or []
    for line in lines:
        if line.startswith(WORKER_MARK):
            console_line(line[len(WORKER_MARK):])
        elif line.startswith(WARNING_MARK) and line not in _warned:
            _warned.add(line)  # every worker warns alike: the console gets it once
            console_error(line[len(WARNING_MARK):])
    rest = [line for line in lines if not line.startswith((WORKER_MARK, WARNING_MARK))]
    if rest:  # with Ray's prefix, to stderr: the current stage's log file
        ray_worker.print_to_stdstream({**data, "lines": rest, "is_err": True},
                                      ignore_prefix=False)


def drain_worker_output(quiet_s: float = 0.3, max_s: float = 2.0) -> None:
    """Wait (at most ``max_s``) until no worker output arrived for ``quiet_s``: the lines a
    finished worker wrote last reach the console before the driver's next line."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline and time.monotonic() - _last_worker_output[0] < quiet_s:
        time.sleep(0.05)


# --------------------------------------------------------------------------- progress

_lock = threading.Lock()
_active: list[Progress] = []


def console_line(text: str) -> None:
    """One line on the console, above the active progress bar if any (which it may advance)."""
    with _lock:
        bar = _active[-1] if _active else None
    if bar is None:
        print(text, flush=True)
    else:
        bar.line(text)


class Progress:
    """A progress bar on a terminal (tqdm on stdout), nothing otherwise.

    ``advance_on``: console lines starting with it (e.g. a worker's ``"train: epoch "``) advance
    the bar by one.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it",
                 advance_on: str | None = None) -> None:
        self.advance_on = advance_on
        self.bar = None
        if is_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stdout, leave=False,
                            dynamic_ncols=True)

    def __enter__(self) -> Progress:
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with _lock:
            if self in _active:
                _active.remove(self)
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int = 1) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def line(self, text: str) -> None:
        """A console line (above the bar on a terminal)."""
        if self.bar is None:
            print(text, flush=True)
        else:
            self.bar.write(text, file=sys.stdout)
        if self.advance_on is not None and text.startswith(self.advance_on):
            self.update(1)

    def note(self, text: str) -> None:
        """A line only without a bar: on a terminal the bar says the same."""
        if self.bar is None:
            print(text, flush=True)


def quiet_ray_data() -> None:
    """Ray Data's own progress bars off: on a terminal :class:`Progress` shows the stage's, and
    without one Ray Data would log its progress every few seconds."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
