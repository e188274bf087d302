"""The jobs' console: the pipeline on the tiny world, its output piped (not a terminal).

One line per event and no line twice; one line per training epoch, from rank 0; nothing of Ray's,
Ray Data's, torch's or DeepSpeed's own notices, which are in the stages' output logs in the
store instead; the last lines are the metrics table and the report path.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_NOTICES = ["constructor arguments", "No CUDA runtime", "deepspeed_shm_comm_op",
                   "Setting accelerator", "Token authentication", "Started a local Ray",
                   "RayTrainWorker", "TrainController", "Reporting training result",
                   "Checkpoint successfully created", "Execution plan of Dataset",
                   "logging_progress", "INFO ", "WARNING", "core_worker.cc"]


@pytest.fixture(scope="module")
def piped_pipeline(tiny_ingest, tmp_path_factory) -> tuple:
    """(console lines, store, config, run metrics) of ``jobs.pipeline`` on a copy of the tiny
    world, its stdout and stderr one pipe."""
    from worlds import copy_store

    from frame_dist.train.artifacts import RunMetrics

    _, ingested, overrides = tiny_ingest
    cfg, store, overrides = copy_store(
        ingested, overrides, tmp_path_factory.mktemp("console") / "store",
        "extract.weights=random", "extract.image_size=64", "extract.batch_size=16",
        "score.kernel=eager")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["FRAME_DIST_RAY_RECORDS"] = str(tmp_path_factory.mktemp("ray-records"))
    done = subprocess.run([sys.executable, "-m", "jobs.pipeline", *overrides], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert done.returncode == 0, done.stdout
    metrics = RunMetrics.read(store, cfg.train.run_name)
    return done.stdout.splitlines(), store, cfg, metrics


@pytest.mark.slow
def test_no_line_twice_and_no_library_notice(piped_pipeline):
    lines, *_ = piped_pipeline
    text = "\n".join(lines)
    twice = {line: n for line, n in collections.Counter(lines).items() if n > 1 and line.strip()}
    assert not twice, text
    for notice in LIBRARY_NOTICES:
        assert notice not in text, f"{notice!r} on the console:\n{text}"
    assert len(lines) < 50, text  # one screen


@pytest.mark.slow
def test_one_line_per_epoch_and_the_table_last(piped_pipeline):
    from frame_dist.evaluate.report import run_summary

    lines, store, cfg, metrics = piped_pipeline
    epochs = [int(m.group(1)) for line in lines if (m := re.match(r"train: epoch (\d+): ", line))]
    assert epochs == list(range(1, metrics.to_dict()["epochs_run"] + 1)), "\n".join(lines)
    assert all("valid auc" in line for line in lines if line.startswith("train: epoch "))
    summary = run_summary(store, cfg.train.run_name).splitlines()
    assert summary[-1].startswith("report: ") and len(summary) >= 4
    assert lines[-len(summary):] == summary


@pytest.mark.slow
def test_the_notices_are_in_the_stage_logs(piped_pipeline):
    _, store, *_ = piped_pipeline

    def output_log(stage: str) -> str:
        folder = Path(store.path("logs", stage))
        logs = sorted(folder.glob("*-output.log"))
        assert logs, f"no output log in {folder}"
        return "\n".join(p.read_text(errors="replace") for p in logs)

    train = output_log("train")
    assert "TrainController" in train and "Requesting resources" in train
    assert "Reporting training result" in train
    assert "Setting accelerator to" in train  # DeepSpeed's notice of its accelerator
    assert "Execution plan of Dataset" in output_log("score")  # Ray Data, on the driver
    assert "Started a local Ray instance" in output_log("extract")


@pytest.mark.parametrize("fails", [False, True])
def test_a_stage_sends_descriptor_2_to_its_output_log(tmp_path, capfd, fails):
    """C++ logging (Ray's core worker) writes to the descriptor, not to sys.stderr."""
    from frame_dist.cli import EXIT_FAILED, EXIT_OK, run_stage
    from frame_dist.config import load_config

    cfg = load_config(None, [f"store.root={tmp_path}/store"])

    def stage() -> None:
        print("our line", flush=True)
        os.write(2, b"[2026-01-01 E 1 1] core_worker.cc:1: a library's notice\n")
        if fails:
            raise RuntimeError("disk on fire")

    assert run_stage("probe", stage, cfg) == (EXIT_FAILED if fails else EXIT_OK)
    out, err = capfd.readouterr()
    assert out == "our line\n" and "notice" not in err
    assert err.count("stage probe") == (2 if fails else 0)
    (log,) = (tmp_path / "store" / "logs" / "probe").glob("*-output.log")
    assert log.read_text() == "[2026-01-01 E 1 1] core_worker.cc:1: a library's notice\n"
    if fails:  # the traceback file names the output log
        (failure,) = set((tmp_path / "store" / "logs" / "probe").glob("*.log")) - {log}
        assert str(log) in failure.read_text()


def test_what_ray_prints_while_it_stops_at_exit_goes_to_a_log(tmp_path):
    """At exit the driver stops Ray (before Ray's own exit handler) with descriptor 2 at
    ``logs/shutdown/`` of the last stage's store: a GCS line about an actor it could not kill
    is not the console's last line, after the metrics table."""
    script = f"""
import os, ray
from frame_dist import ray_runtime
from frame_dist.cli import run_stage
from frame_dist.config import load_config

def shutdown(**kwargs):
    assert kwargs == {{"_exiting_interpreter": True}}, kwargs
    os.write(2, b"(pid=gcs_server) E gcs_actor_scheduler.cc:538: Failed to kill actor\\n")

ray.is_initialized, ray.shutdown = (lambda: True), shutdown  # a driver connected to Ray
ray_runtime._shutdown_at_exit()
cfg = load_config(None, ["store.root={tmp_path}/store"])
assert run_stage("score", lambda: print("scored", flush=True), cfg) == 0
print("report: the last line", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "scored\nreport: the last line\n" and done.stderr == "", done
    (log,) = (tmp_path / "store" / "logs" / "shutdown").glob("*-output.log")
    assert "Failed to kill actor" in log.read_text()


def _python_default(message, category, filename, lineno, file=None, line=None) -> None:
    """Python's own ``showwarning`` outside pytest (which records warnings instead): the
    formatted warning on descriptor 2."""
    import warnings

    os.write(2, warnings.formatwarning(message, category, filename, lineno, line).encode())


def test_our_warnings_reach_the_console_once_library_ones_the_log(tmp_path, capfd, monkeypatch):
    """frame-dist's own warnings -- the bf16-on-this-CPU notice, a lease heartbeat that the
    store refused -- are one line each on the console's stderr while the stage's stderr goes
    to its log; a library's warning stays in the log."""
    import warnings

    from feature_store.lease import StageLease
    from feature_store.store import Store
    from frame_dist.cli import EXIT_OK, run_stage
    from frame_dist.config import load_config
    from frame_dist.train import trainer

    cfg = load_config(None, [f"store.root={tmp_path}/store"])
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: False)  # this CPU: no bf16 units
    # an earlier test of this process may have warned from the same place already
    monkeypatch.setattr(trainer, "__warningregistry__", {}, raising=False)
    monkeypatch.setattr(warnings, "showwarning", _python_default)  # not pytest's recorder

    def stage() -> None:
        for _ in range(3):  # warned once per place, as Python does
            trainer.autocast_for("cpu", "bf16")
        warnings.warn("a library's notice", UserWarning, stacklevel=1)
        with StageLease(Store.from_config(cfg.store), "probe", ttl_s=0.3) as lease:
            # the store refuses the heartbeat's write: the lease file's path is a folder now
            path = lease._file(lease.record.generation)
            os.remove(path)
            os.mkdir(path)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "heartbeat failed" not in _err_so_far():
                time.sleep(0.05)
            os.rmdir(path)  # the store answers again: the lease is released normally

    def _err_so_far() -> str:
        out, err = capfd.readouterr()
        seen.append(err)
        return "".join(seen)

    seen: list[str] = []
    assert run_stage("probe", stage, cfg) == EXIT_OK
    err = _err_so_far()
    lines = err.splitlines()
    bf16 = [line for line in lines if "train.precision='bf16'" in line]
    assert bf16 == ["warning: train.precision='bf16' on a CPU without bf16 instructions "
                    "(AVX512-BF16 or AMX-BF16): it runs, but emulated and likely slower than "
                    "train.precision='fp32'"]
    heartbeat = [line for line in lines if "heartbeat failed" in line]
    assert heartbeat and all(line.startswith("warning: lease probe: heartbeat failed (")
                             and line.endswith("); retrying") for line in heartbeat), err
    assert "library's notice" not in err
    (log,) = (tmp_path / "store" / "logs" / "probe").glob("*-output.log")
    text = log.read_text()
    assert "UserWarning: a library's notice" in text
    assert "bf16" not in text and "heartbeat" not in text


def test_workers_warnings_reach_the_console_once(capfd, monkeypatch):
    """In a Ray worker our warnings become marked lines (route_worker_warnings); the driver's
    router puts each on the console's stderr once, however many workers send it, and the rest
    of the workers' output goes on to the stage's log."""
    import warnings

    from frame_dist import console

    monkeypatch.setattr(warnings, "showwarning", _python_default)  # not pytest's recorder
    monkeypatch.setattr(console, "_worker_warnings", [False])
    console.route_worker_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("probe: ours", console.FrameDistWarning, stacklevel=1)
        warnings.warn("probe: a library's", UserWarning, stacklevel=1)
    out, err = capfd.readouterr()
    assert out == f"{console.WARNING_MARK}warning: probe: ours\n"
    assert "probe: a library's" in err and "ours" not in err

    routed: list[dict] = []
    from ray._private import worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream",
                        lambda data, ignore_prefix: routed.append(data))
    monkeypatch.setattr(console, "_warned", set())
    for pid in (11, 12):  # two workers, the same warning
        console._route({"lines": [out.rstrip("\n"), "a worker's notice"], "pid": pid})
    out, err = capfd.readouterr()
    assert err == "warning: probe: ours\n" and out == ""
    assert [d["lines"] for d in routed] == [["a worker's notice"]] * 2
