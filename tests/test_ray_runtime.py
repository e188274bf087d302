"""The local Ray instance of a job (frame_dist/ray_runtime.py): leftovers of a SIGKILLed driver
are ended by the next start, and two jobs' local instances on one machine do not collide."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from frame_dist import ray_runtime

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent("""
    import time
    from frame_dist.ray_runtime import init_ray
    init_ray(num_cpus=1)
    print("up", flush=True)
    time.sleep(600)
""")

TRAIN = textwrap.dedent("""
    import ray.train
    from ray.train.torch import TorchTrainer
    from frame_dist.ray_runtime import init_ray
    init_ray(num_cpus=1)
    def loop(config):
        ray.train.report({"x": 1})
    TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1)).fit()
    print("trained", flush=True)
""")


def _env(tmp_path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.getcwd(), FRAME_DIST_RAY_RECORDS=str(tmp_path / "rec"))
    env.pop("RAY_ADDRESS", None)
    return env


def _start_driver(tmp_path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_a_killed_drivers_ray_processes_are_ended_by_the_next_start(tmp_path, monkeypatch):
    driver = _start_driver(tmp_path)
    record = tmp_path / "rec" / f"{driver.pid}.json"
    assert record.exists()
    time.sleep(4)  # the driver re-records the agents the raylet starts after ray.init
    children = driver_children = psutil.Process(driver.pid).children(recursive=True)
    recorded = json.loads(record.read_text())
    session, marker = recorded["session"], recorded["marker"]
    assert "/session_" in session and ray_runtime._session_processes(session, marker)
    assert children, "the local instance started no process?"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)
    lingering = [p.pid for p in driver_children if p.is_running()]
    monkeypatch.setattr(ray_runtime, "RECORDS", str(tmp_path / "rec"))
    ended = ray_runtime.reap_leftovers()
    assert set(lingering) <= set(ended)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    # agents the raylet started after the record was written name the session: gone too
    assert ray_runtime._session_processes(session, marker) == []
    assert not record.exists()


def test_two_local_jobs_on_one_machine_do_not_reach_each_others_instance(tmp_path):
    other = _start_driver(tmp_path)  # another job's local instance stays up meanwhile
    try:
        run = subprocess.run([sys.executable, "-c", TRAIN], env=_env(tmp_path),
                             capture_output=True, text=True, timeout=400)
    finally:
        os.kill(other.pid, signal.SIGTERM)
        other.wait()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained" in run.stdout
    assert "Found multiple active Ray instances" not in run.stdout + run.stderr
