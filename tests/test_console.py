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
    assert "PreemptionWatcher" in train and "constructor arguments" in train
    assert "Reporting training result" in train
    assert "DeepSpeed" in train or "deepspeed" in train
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
