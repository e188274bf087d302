"""Experiment tracking with MLflow (frame_dist/tracking.py): the real jobs against a real server.

* ``mlflow_server`` (module): ``mlflow server`` on 127.0.0.1 (a free port, a SQLite backend and
  an artifacts folder under the test's temporary directory), stopped afterwards through its own
  process group (its PID).
* The tiny world (``tiny_world``: graph committed, no run) is trained by ``jobs.train`` on the
  session's local Ray and evaluated by ``jobs.evaluate``, both with ``tracking.mlflow_uri`` set;
  the MLflow run is read back with ``MlflowClient``: params, one point per epoch, the test and
  evaluation metrics, the artifacts.
* Without tracking no job imports mlflow; asked for without the extra, every tracking job exits 2
  naming it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from worlds import copy_store, train_and_save  # tests/ is on sys.path (pytest)

from frame_dist.cli import EXIT_CONFIG, run_stage
from frame_dist.config import load_config
from frame_dist.tracking import EXTRA, RECORD_FILE, TrackingExtraMissing, config_params
from frame_dist.train.artifacts import run_path

ROOT = Path(__file__).resolve().parents[1]
RUN = "tracked"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The tracking URI of a real MLflow server on 127.0.0.1, for the module."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts")],
        # no job runner (MLflow's GenAI jobs; a third of the server's start-up CPU here)
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: uvicorn and the job runner with it
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine: 120 s was seen too short
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n"
                                   + (folder / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own group, by its PID
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def tracked_run(ray_local, mlflow_server, tiny_world, tmp_path_factory):
    """jobs.train + jobs.evaluate on a copy of the tiny world, tracked; their MLflow run."""
    from mlflow.tracking import MlflowClient

    from jobs import evaluate as evaluate_job
    from jobs import train as train_job

    _, store, overrides = tiny_world
    cfg, store, overrides = copy_store(
        store, overrides, tmp_path_factory.mktemp("tracking") / "store", f"train.run_name={RUN}",
        "train.workers=1", f"tracking.mlflow_uri={mlflow_server}",
        "tracking.experiment=frame-dist-test")
    assert train_job.main(overrides) == 0
    assert evaluate_job.main(overrides) == 0
    record = store.read_json(run_path(RUN, RECORD_FILE))
    client = MlflowClient(tracking_uri=mlflow_server)
    return cfg, store, overrides, client, client.get_run(record["run_id"]), record


@pytest.mark.slow
def test_train_and_evaluate_log_into_one_mlflow_run(tracked_run):
    cfg, store, _, client, run, record = tracked_run
    experiment = client.get_experiment_by_name("frame-dist-test")
    assert record["experiment_id"] == experiment.experiment_id == run.info.experiment_id
    assert run.info.run_name == RUN and run.info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [
        run.info.run_id]  # evaluate found the train stage's run
    # the resolved config as params, section.key
    params = run.data.params
    assert params == config_params(cfg.to_dict())
    assert params["train.run_name"] == RUN and params["graph.n_clips"] == "4"
    assert params["evaluate.ks"] == "[3, 5]" and not any(k.startswith("tracking.") for k in params)

    # one point per epoch, step = epoch, equal to metrics.json's history
    metrics = store.read_json(run_path(RUN, "metrics.json"))
    history = metrics["history"]
    assert len(history) == metrics["epochs_run"] >= 2
    for key, values in (("train/loss", [h["loss"] for h in history]),
                        ("train/pairwise", [h["pairwise"] for h in history]),
                        ("valid/auc", [h["valid"]["auc"] for h in history]),
                        ("valid/ndcg_at_5", [h["valid"]["ndcg@5"] for h in history])):
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == [h["epoch"] for h in history], key
        assert [m.value for m in points] == pytest.approx(values, rel=1e-12, abs=0), key

    # the test metrics (train stage) and the evaluate stage's
    logged = run.data.metrics
    for name, value in metrics["test"].items():
        if name not in ("n", "positives", "ranked_users"):
            assert logged[f"test/{name.replace('@', '_at_')}"] == pytest.approx(value, rel=1e-12)
    evaluation = store.read_json(run_path(RUN, "evaluation.json"))
    assert logged["evaluate/auc"] == pytest.approx(evaluation["model"]["auc"], rel=1e-12)
    assert logged["evaluate/recall_at_3"] == pytest.approx(evaluation["model"]["recall@3"],
                                                           rel=1e-12)
    assert logged["oracle/auc"] == pytest.approx(evaluation["oracle"]["auc"], rel=1e-12)

    # the run's files; the model card as the evaluate stage rewrote it
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "metrics.json", "config.yaml", "report.md", "report.json",
            "evaluation.json", "training_curve.png"} <= names, names
    card = Path(client.download_artifacts(run.info.run_id, "model_card.md"))
    assert card.read_bytes() == store.read_bytes(run_path(RUN, "model_card.md"))


@pytest.mark.slow
def test_evaluating_again_logs_into_the_same_run(tracked_run, capsys):
    from jobs import evaluate as evaluate_job

    _, store, overrides, client, run, record = tracked_run
    capsys.readouterr()
    assert evaluate_job.main(overrides) == 0
    out = capsys.readouterr().out
    page = f"{record['uri']}/#/experiments/{record['experiment_id']}/runs/{record['run_id']}"
    assert f"; logged to MLflow: {page}\n" in out
    assert "View run" not in out  # MLflow's own lines about the run: ours is the one above
    assert store.read_json(run_path(RUN, RECORD_FILE)) == record
    points = client.get_metric_history(run.info.run_id, "evaluate/auc")
    assert len(points) == 2 and points[0].value == pytest.approx(points[1].value, rel=1e-12)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_without_tracking_no_job_imports_mlflow(tiny_world, tmp_path):
    """jobs.evaluate run for real (a saved model on a copy of the tiny world), tracking off: no
    mlflow module is loaded and the run folder has no tracking record."""
    _, store, overrides = tiny_world
    cfg, store, overrides = copy_store(store, overrides, tmp_path / "store",
                                       f"train.run_name={RUN}", "train.epochs=1")
    train_and_save(cfg, store)
    script = ("import json, sys\n"
              "from jobs import evaluate, pipeline, sweep, train\n"
              "import frame_dist.train.ray_loop\n"
              "rc = evaluate.main(json.loads(sys.argv[1]))\n"
              "print(json.dumps({'rc': rc, 'mlflow': sorted(m for m in sys.modules\n"
              "                  if m.split('.')[0] == 'mlflow')}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(overrides)], cwd=ROOT,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"rc": 0, "mlflow": []}
    assert store.exists(run_path(RUN, "evaluation.json"))
    assert not store.exists(run_path(RUN, RECORD_FILE))


@pytest.mark.parametrize("where", ["config", "environment"])
def test_tracking_without_the_extra_exits_2_naming_it(tmp_path, monkeypatch, capsys, where):
    from jobs import evaluate as evaluate_job
    from jobs import pipeline as pipeline_job
    from jobs import sweep as sweep_job
    from jobs import train as train_job

    for name in ("mlflow", "mlflow.tracking"):  # not installed, as far as imports go
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"store.root={tmp_path}/store"]
    if where == "config":
        overrides.append("tracking.mlflow_uri=http://127.0.0.1:9")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    for job in (train_job, evaluate_job, pipeline_job, sweep_job):
        with pytest.raises(SystemExit) as exc:
            job.main(overrides)
        assert exc.value.code == EXIT_CONFIG, job.__name__
        err = capsys.readouterr().err
        assert f"but mlflow is not installed: {EXTRA}" in err, err
        assert "(http://127.0.0.1:9)" in err
    assert EXTRA == "pip install 'frame-dist[mlflow]'"
    assert not (tmp_path / "store").exists()  # refused before anything ran
    # called as a library (jobs.sweep calls train.train): the stage refuses its configuration
    cfg = load_config(None, overrides)
    with pytest.raises(TrackingExtraMissing):
        train_job.train(cfg)
    assert run_stage("train", lambda: train_job.train(cfg), cfg) == EXIT_CONFIG
