"""Connecting to Ray: the cluster a job runs in, or a local instance when there is none.

What a local instance listens on (Ray 2.60; docs/cluster.md, "A local instance"): the
dashboard and the job API on 127.0.0.1 only; Ray's gRPC servers (GCS, raylet, object manager,
every worker) on all interfaces -- this Ray cannot bind them to one address -- and they refuse
callers without the cluster's token (RAY_AUTH_MODE=token, Ray's default here). Each local
instance is addressed explicitly (its own dashboard port, passed to its workers), so two jobs
on one machine never reach each other's instance, and the processes a local instance started
are recorded, so that a driver killed with SIGKILL does not leave Ray's agents behind: the next
local start on this machine ends exactly those processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

# Ray Train's controller polls its workers this often (Ray's default: 2 s). Every report, the
# end of a run and its start wait for a poll, which makes a small run on one machine ~10 s
# slower; a local instance (and the tests' instances) poll every 0.25 s instead. A local
# instance is this one machine, which no cloud preempts: no PreemptionWatcher actor (one more
# process per run, ~2 s of CPU to start) either. Nor worker processes started ahead of any
# task when the driver connects: they idled unused in short local runs (~2 s of CPU each).
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                 "RAY_prestart_worker_first_driver": "0"}


def use_local_ray_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Add :data:`LOCAL_RAY_ENV` to ``env`` (default: this process's environment, which a
    local Ray instance and its workers inherit) where not already set; return ``env``."""
    env = os.environ if env is None else env
    for key, value in LOCAL_RAY_ENV.items():
        env.setdefault(key, value)
    return env


def init_ray(num_cpus: int | None = None) -> None:
    """Join the Ray cluster named by ``RAY_ADDRESS``, or start a local instance.

    ``ray job submit`` sets ``RAY_ADDRESS`` for the job's driver, so submitted jobs run on their
    cluster; on a cluster node, ``RAY_ADDRESS=auto python -m jobs.X`` joins the node's cluster.
    Without it a fresh local instance starts on 127.0.0.1 (its dashboard, which Ray Train's
    state queries use, listens on 127.0.0.1 only; module docstring for the rest), addressed
    explicitly: never another user's cluster or job that happens to run on the same machine.
    Leftovers of killed local drivers are ended first. A local instance gets
    :data:`LOCAL_RAY_ENV`.
    """
    import ray

    if ray.is_initialized():
        return
    from frame_dist.console import route_worker_logs

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        route_worker_logs()  # workers' marked lines to the console, the rest to the stage log
        _shutdown_at_exit()
        return
    use_local_ray_env()
    reap_leftovers()
    # every process of this instance inherits the marker (workers rename themselves, so their
    # command lines do not say which instance they belong to; their environment does)
    os.environ[INSTANCE_ENV] = uuid.uuid4().hex
    port = _free_port()
    # Ray's state API (Ray Train's PlacementGroupCleaner uses it inside the instance) finds its
    # server through RAY_API_SERVER_ADDRESS, else by scanning for "the" local instance, which
    # fails as soon as two jobs run on one machine: name this instance's dashboard explicitly.
    # The raylet, and so every worker it starts, inherits it from this process's environment
    # while ray.init starts it (a job-level runtime_env would too, but then every worker starts
    # through Ray's setup_worker.py and the runtime-env agent: ~1.5 s more CPU per worker).
    with _environment({"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port, _node_ip_address="127.0.0.1",
                 log_to_driver=True)
    route_worker_logs()
    _shutdown_at_exit()
    record_local_instance()
    # the raylet starts its agents a moment later, and their renamed command lines and
    # environments no longer say which instance they belong to: record them as they appear
    threading.Thread(target=_keep_recording, daemon=True, name="ray-record").start()


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment meanwhile (the processes it starts inherit
    them); the previous values afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _shutdown_at_exit() -> None:
    """Stop Ray at exit before Ray's own handler does (handlers run last-registered first, and
    ``ray.init`` registers Ray's each time), with the driver's stderr at the last stage's log
    (:func:`frame_dist.console.after_stages`)."""
    import atexit

    atexit.unregister(_shutdown)
    atexit.register(_shutdown)


def _shutdown() -> None:
    import ray

    from frame_dist.console import after_stages

    if ray.is_initialized():
        after_stages(lambda: ray.shutdown(_exiting_interpreter=True))  # its wait for late lines


# --------------------------------------------------------------------------- leftovers

# one file per local driver (FRAME_DIST_RAY_RECORDS: another folder, for tests)
RECORDS = os.environ.get("FRAME_DIST_RAY_RECORDS") or os.path.join(tempfile.gettempdir(),
                                                                    "frame-dist-ray")


INSTANCE_ENV = "FRAME_DIST_RAY_INSTANCE"  # marks every process of one local instance


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def record_local_instance() -> str:
    """Record the processes this driver's local instance started (pid + start time) and its
    session directory (unique to the instance: agents the raylet starts later name it)."""
    import psutil
    import ray

    me = psutil.Process()
    procs = [{"pid": p.pid, "started": p.create_time(), "name": p.name()}
             for p in me.children(recursive=True)]
    session = ray._private.worker._global_node.get_session_dir_path()
    marker = os.environ.get(INSTANCE_ENV)
    os.makedirs(RECORDS, exist_ok=True)
    path = os.path.join(RECORDS, f"{me.pid}.json")
    with open(path, "w") as f:
        json.dump({"driver": me.pid, "driver_started": me.create_time(), "session": session,
                   "marker": marker, "processes": procs}, f)
    return path


def _keep_recording() -> None:
    for delay in (0.5, 1, 2, 4, 8, 16, 30):
        time.sleep(delay)
        try:
            record_local_instance()
        except Exception:  # noqa: BLE001 - Ray shut down meanwhile: nothing more to record
            return


def reap_leftovers(grace_s: float = 3.0) -> list[int]:
    """End the processes recorded by local drivers of this machine that are gone (killed).

    Only processes that this project's drivers started are touched: a recorded pid that still
    has its recorded start time (a reused pid is left alone), or a process of this user whose
    command line names the dead instance's own session directory or whose environment carries
    the instance's marker (:data:`INSTANCE_ENV`). Returns the ended pids.
    """
    import psutil

    if not os.path.isdir(RECORDS):
        return []
    ended: list[int] = []
    for name in os.listdir(RECORDS):
        path = os.path.join(RECORDS, name)
        try:
            with open(path) as f:
                record = json.load(f)
            driver_alive = _same_process(record["driver"], record["driver_started"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # another driver is writing it, or it is not ours
        if driver_alive:
            continue
        victims = [p["pid"] for p in record["processes"] if _same_process(p["pid"], p["started"])]
        victims += [child.pid for pid in list(victims) for child in _descendants(pid)
                    if child.pid not in victims]
        victims += [pid for pid in _session_processes(record.get("session"), record.get("marker"))
                    if pid not in victims]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        for pid in victims:
            try:
                psutil.Process(pid).wait(timeout=max(0.0, deadline - time.time()))
            except psutil.TimeoutExpired:
                try:
                    os.kill(pid, signal.SIGKILL)
                    psutil.Process(pid).wait(timeout=grace_s)  # gone, or a zombie of init
                except (ProcessLookupError, psutil.NoSuchProcess, psutil.TimeoutExpired):
                    pass
            except psutil.NoSuchProcess:
                pass
        ended += victims
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return ended


def _session_processes(session: str | None, marker: str | None = None) -> list[int]:
    """Pids of this user's processes whose command line names ``session`` (a session dir) or
    whose environment has ``INSTANCE_ENV=marker``."""
    import psutil

    if not (session and "session_" in session) and not marker:
        return []
    out = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real != os.getuid():
                continue
            if session and "session_" in session and any(
                    session in arg for arg in proc.info["cmdline"] or ()):
                out.append(proc.info["pid"])
            elif marker and proc.environ().get(INSTANCE_ENV) == marker:
                out.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return [pid for pid in out if pid != os.getpid()]


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _same_process(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1e-3
    except psutil.NoSuchProcess:
        return False


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
