"""A real Ray head on 127.0.0.1 for tests: token authentication, its own temp dir and ports.

``start_ray_head(base)`` generates a token with ``ray get-auth-token --generate`` (under a
private HOME, so ``~/.ray/auth_token`` of this machine is never read or written), starts
``ray start --head --block`` in its own session (temp dir ``<base>/r``, free ports, worker ports
in a window of their own, dashboard on 127.0.0.1) and waits until the job API answers and the
node is alive. The returned :class:`RayHead` runs the ``ray`` CLI against it
(``head.ray("job", "submit", ...)``) with the token in the environment, and ``head.stop()``
ends exactly the processes this head started, in ``ray stop``'s order.

How this head's processes are found: every process Ray starts (GCS, raylet, dashboard, workers,
job drivers, which Ray puts in sessions of their own) inherits the head's environment, which
carries a marker variable unique to this head. ``head.pids()`` reads it from ``/proc``; nothing
is ever matched by process name, so other Ray instances on the machine are left alone
(``ray stop`` would stop them all).

Not a pytest plugin: test modules import it (``from ray_head import start_ray_head``; pytest
puts tests/ on sys.path) and wrap it in their own fixtures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from frame_dist.ray_runtime import use_local_ray_env

MARKER_ENV = "FRAME_DIST_TEST_RAY_HEAD"  # set in the head's environment; identifies its processes
# Variables of an outer Ray or an outer token that must not leak into this head or its clients.
SCRUBBED_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                "RAY_JOB_ID", "RAY_RUNTIME_ENV_HOOK")


class RayHeadError(RuntimeError):
    """The head did not come up, or did not go away."""


def ray_cli() -> str:
    """The ``ray`` executable of the running interpreter's environment (venv bin dir)."""
    path = Path(sys.executable).parent / "ray"
    if not path.exists():
        raise RayHeadError(f"no ray executable next to {sys.executable}")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_window(size: int, low: int = 20000, high: int = 30000, tries: int = 50) -> int:
    """First port of ``size`` consecutive ports that are free now (outside the ephemeral range).

    Ray hands worker ports out of ``[min_worker_port, max_worker_port]``; two Ray instances on
    one machine with the default window would race for the same ports.
    """
    for _ in range(tries):
        start = random.randrange(low, high - size)
        if all(_port_free(p) for p in range(start, start + size)):
            return start
    raise RayHeadError(f"no window of {size} free ports in [{low}, {high})")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class RayHead:
    """A running head: addresses, the client environment, and how to stop it."""

    temp_dir: Path  # Ray's --temp-dir (sessions, logs, sockets)
    dashboard_url: str  # http://127.0.0.1:<port>: job submission address
    gcs_address: str  # 127.0.0.1:<port>
    token: str  # the bearer token every client must send
    env: dict[str, str]  # environment for clients: token path, auth mode, venv PATH
    marker: str  # value of MARKER_ENV in every process of this head
    process: subprocess.Popen  # `ray start --head --block`
    log_path: Path  # stdout/stderr of `ray start`
    stopped: bool = field(default=False)

    def ray(self, *args: str, timeout: float = 180, cwd: str | Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``ray <args>`` against this head; returns the completed process (text output)."""
        return subprocess.run([ray_cli(), *args], env=env or self.env, cwd=cwd, text=True,
                              capture_output=True, timeout=timeout)

    def http_get(self, path: str, token: str | None = None) -> tuple[int, str]:
        """GET ``path`` on the dashboard, with ``token`` as bearer token (None: no header)."""
        request = urllib.request.Request(self.dashboard_url + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def pids(self) -> list[int]:
        """Live processes that belong to this head (found by the marker in their environment)."""
        return pids_with_env(MARKER_ENV, self.marker)

    def stop(self, grace_s: float = 5.0) -> list[int]:
        """Stop this head the way ``ray stop`` does, but only its own processes.

        SIGTERM in ``ray stop``'s order (raylet, then everything else, then gcs_server, then
        ``ray start --block``), each step waiting up to ``grace_s``; SIGKILL what is left.
        Returns the processes still alive afterwards (empty when the head is gone).
        """
        if not self.stopped:
            self.stopped = True
            for step in ("raylet", "other", "gcs_server", "ray start"):
                pids = [p for p in self.pids() if _stop_step(p, self.process.pid) == step]
                _signal_all(pids, signal.SIGTERM)
                _wait_gone(pids, grace_s)
            _signal_all(self.pids(), signal.SIGKILL)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _wait_gone(self.pids(), 5.0)
        return self.pids()


def _stop_step(pid: int, start_pid: int) -> str:
    if pid == start_pid:
        return "ray start"
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return "other"
    return comm if comm in ("raylet", "gcs_server") else "other"


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def pids_with_env(name: str, value: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose environment has ``name=value``."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if needle in env and state != b"Z":
            found.append(int(entry))
    return sorted(found)


def generate_token(home: Path, base_env: dict[str, str]) -> Path:
    """``ray get-auth-token --generate`` with HOME=``home``; returns the token file it wrote."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**base_env, "HOME": str(home)}
    done = subprocess.run([ray_cli(), "get-auth-token", "--generate"], env=env, text=True,
                          capture_output=True, timeout=60)
    token_file = home / ".ray" / "auth_token"
    if done.returncode != 0 or not token_file.exists():
        raise RayHeadError(f"ray get-auth-token --generate failed ({done.returncode}): "
                           f"{done.stderr[-2000:]}")
    if done.stdout.strip() != token_file.read_text().strip():
        raise RayHeadError("ray get-auth-token printed a token other than the one it saved")
    return token_file


def start_ray_head(base: str | Path, *, num_cpus: int = 2, object_store_mb: int = 300,
                   timeout_s: float = 90.0) -> RayHead:
    """Start a token-authenticated head on 127.0.0.1 under ``base``; wait until jobs can run.

    ``base`` should be a short path: Ray's unix sockets live under ``<base>/r`` and a socket
    path may not exceed 107 bytes.
    """
    base = Path(base)
    temp_dir = base / "r"
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    token_file = generate_token(base / "home", env)
    marker = uuid.uuid4().hex
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Single-node Ray on loopback: without this, Ray replaces 127.0.0.1 by the machine's
        # routable address (services.resolve_ip_for_localhost) and binds GCS and the client
        # server there.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        MARKER_ENV: marker,
    })
    use_local_ray_env(env)  # Ray Train polls its workers every 0.25 s, not 2 s
    gcs, dashboard = free_port(), free_port()
    workers = free_port_window(200)
    args = [
        ray_cli(), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--min-worker-port={workers}", f"--max-worker-port={workers + 199}",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--object-store-memory={object_store_mb * 2**20}", f"--temp-dir={temp_dir}",
    ]
    log_path = base / "ray_start.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    head = RayHead(temp_dir=temp_dir, dashboard_url=f"http://127.0.0.1:{dashboard}",
                   gcs_address=f"127.0.0.1:{gcs}", token=token_file.read_text().strip(),
                   env=env, marker=marker, process=process, log_path=log_path)
    try:
        _wait_ready(head, timeout_s)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_ready(head: RayHead, timeout_s: float) -> None:
    """Wait until the job API lists jobs and the head's node is alive."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RayHeadError(f"ray start exited with {head.process.returncode}:\n"
                               f"{head.log_path.read_text()[-4000:]}")
        try:
            status, body = head.http_get("/api/jobs/", head.token)
            if status == 200:
                status, body = head.http_get("/nodes?view=summary", head.token)
                if status == 200 and _alive_nodes(body) >= 1:
                    return
            last = f"HTTP {status}: {body[:300]}"
        except OSError as exc:  # not listening yet
            last = repr(exc)
        time.sleep(1.0)
    raise RayHeadError(f"the head did not become ready in {timeout_s:.0f}s (last: {last}):\n"
                       f"{head.log_path.read_text()[-4000:]}")


def _alive_nodes(body: str) -> int:
    try:
        summary = json.loads(body)["data"]["summary"]
    except (ValueError, KeyError, TypeError):
        return 0
    return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")
