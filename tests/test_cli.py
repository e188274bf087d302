"""The jobs' failure contract: a one-line cause, the path of the full traceback (a log file per
stage in the store), exit codes 1 and 2."""

from __future__ import annotations

import os

import pytest

from frame_dist.cli import EXIT_FAILED, run_stage
from frame_dist.config import load_config


def test_a_failed_stage_prints_its_cause_and_where_the_traceback_is(tmp_path, capsys):
    from jobs import evaluate as evaluate_job

    root = tmp_path / "store"
    assert evaluate_job.main([f"store.root={root}", "train.run_name=never-trained"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (f"stage evaluate failed: StoreError: no trained model at {root}/runs/"
                      "never-trained/model.pt: run the train stage first "
                      "(train.run_name=never-trained)")
    assert err[1].startswith(f"stage evaluate: full traceback in {root}/logs/evaluate/")
    assert len(err) == 2  # no traceback on the console
    log = err[1].split(" in ", 1)[1]
    text = open(log).read()
    assert text.startswith("stage evaluate failed at ")
    assert "Traceback (most recent call last)" in text and "no trained model at" in text


def test_without_a_store_the_log_goes_to_the_temporary_directory(capsys):
    def boom() -> None:
        raise RuntimeError("disk on fire")

    assert run_stage("graph", boom) == EXIT_FAILED
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "stage graph failed: RuntimeError: disk on fire"
    path = err[1].split(" in ", 1)[1]
    assert "frame-dist-logs/graph/" in path and "RuntimeError: disk on fire" in open(path).read()
    os.remove(path)


def test_a_store_that_cannot_take_the_log_is_named(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = load_config(None, [f"store.root={blocker}"])  # the store's root is a file
    assert run_stage("score", lambda: 1 / 0, cfg) == EXIT_FAILED
    line = capsys.readouterr().err.splitlines()[1]
    assert "frame-dist-logs/score/" in line and "(the store could not take it: " in line
    os.remove(line.split(" in ", 1)[1].split(" (the store")[0])


@pytest.mark.parametrize("root", ["gs://bucket/x", "http://host/x"])
def test_an_unsupported_store_scheme_is_a_configuration_error(root, capsys):
    from jobs import ingest as ingest_job

    with pytest.raises(SystemExit) as exited:
        ingest_job.main([f"store.root={root}"])
    assert exited.value.code == 2
    assert (f"store.root={root!r}: only local paths, file:// and s3:// URIs are supported"
            in capsys.readouterr().err)
