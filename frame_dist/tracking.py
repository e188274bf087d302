"""Experiment tracking with MLflow: the optional extra ``pip install frame-dist[mlflow]``.

Off unless ``tracking.mlflow_uri`` (else ``MLFLOW_TRACKING_URI``) names a tracking server or
store; mlflow is imported only then. One MLflow run per training run: its id is kept in
``runs/<run>/tracking.json`` (:class:`TrackingRecord`), so a resumed run and the evaluate stage
log into the same MLflow run.

* train driver (``ray_loop.run_training``): :func:`open_run` finds or creates the MLflow run and,
  when it creates it, logs the resolved config as params (``section.key``; the tracking section
  itself is left out); marks it FINISHED or FAILED at the end.
* rank 0 of the train workers (:class:`RunLogger`): ``train/*`` and ``valid/*`` every epoch
  (step = epoch), then ``test/*`` and the run's files (model_card.md, metrics.json, config.yaml).
* evaluate (:func:`log_evaluation`): ``evaluate/*`` and ``oracle/*`` (evaluation.json), the run
  report with its plots and the rewritten model_card.md.

Metric names keep MLflow's character set: ``recall@5`` is logged as ``recall_at_5``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from feature_store.store import Store
from frame_dist.config import Config, ConfigError
from frame_dist.console import FrameDistWarning
from frame_dist.train.artifacts import run_path

EXTRA = "pip install 'frame-dist[mlflow]'"
RECORD_FILE = "tracking.json"  # in the run's folder (run_path)
COUNT_KEYS = ("n", "positives", "ranked_users")  # metric dicts' counts, not metrics
TRAIN_KEYS = ("loss", "pointwise", "pairwise", "l2", "seconds")  # of an epoch's record
TRAIN_FILES = ("model_card.md", "metrics.json", "config.yaml")


class TrackingExtraMissing(ConfigError):
    """Tracking is asked for, but mlflow is not installed (exit code 2: nothing ran)."""


def tracking_uri(cfg: Config) -> str | None:
    """``tracking.mlflow_uri``, else ``MLFLOW_TRACKING_URI``; None: tracking is off."""
    return cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def require_mlflow(cfg: Config) -> None:
    """Refuse (:class:`TrackingExtraMissing`) a config that tracks when mlflow is missing; with
    tracking off, nothing is imported."""
    uri = tracking_uri(cfg)
    if uri is not None:
        _client_class(uri)


def _client_class(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        where = ("tracking.mlflow_uri" if not os.environ.get("MLFLOW_TRACKING_URI")
                 else "MLFLOW_TRACKING_URI / tracking.mlflow_uri")
        raise TrackingExtraMissing(
            f"{where} is set ({uri}) but mlflow is not installed: {EXTRA}, or unset it to "
            "run without tracking") from exc
    return MlflowClient


def metric_key(prefix: str, name: str) -> str:
    """``valid`` + ``recall@5`` -> ``valid/recall_at_5`` (MLflow refuses '@')."""
    return f"{prefix}/{name.replace('@', '_at_')}"


def metric_values(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict under ``prefix/`` (counts left out)."""
    return {metric_key(prefix, k): float(v) for k, v in metrics.items()
            if k not in COUNT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def config_params(cfg: dict[str, Any]) -> dict[str, str]:
    """The resolved config as MLflow params: ``section.key`` -> text (lists and numbers as
    JSON). The tracking section is left out: it says where results go, not what they are."""
    return {f"{section}.{key}": value if isinstance(value, str) else json.dumps(value)
            for section, fields in cfg.items() if section != "tracking"
            for key, value in fields.items()}


# --------------------------------------------------------------------------- tracking.json


@dataclass
class TrackingRecord:
    """``runs/<run>/tracking.json``: the MLflow run a training run logs into."""

    uri: str  # tracking URI the run lives on (another URI: another run)
    experiment_id: str
    run_id: str

    @classmethod
    def read(cls, store: Store, run_name: str) -> TrackingRecord | None:
        path = run_path(run_name, RECORD_FILE)
        if not store.exists(path):
            return None
        data = store.read_json(path)
        try:
            return cls(str(data["uri"]), str(data["experiment_id"]), str(data["run_id"]))
        except (KeyError, TypeError):
            return None  # unreadable: a new MLflow run replaces it

    def write(self, store: Store, run_name: str) -> None:
        store.write_json(run_path(run_name, RECORD_FILE), asdict(self))


# --------------------------------------------------------------------------- the MLflow run


@dataclass
class TrackedRun:
    """An open MLflow run (picklable: Ray Train ships it to the workers)."""

    uri: str
    run_id: str
    experiment_id: str = ""
    created: bool = False  # this call created it (and logged the params)

    def where(self) -> str:
        """The run for people: its page on a tracking server, else its id and URI."""
        if self.uri.startswith(("http://", "https://")) and self.experiment_id:
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} ({self.uri})"

    def client(self) -> Any:
        return _client_class(self.uri)(tracking_uri=self.uri)

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        client = self.client()
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_files(self, store: Store, run_name: str, names: tuple[str, ...] | list[str]) -> None:
        """Files of the run's folder as artifacts (those that exist; from any store)."""
        client = self.client()
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                path = run_path(run_name, name)
                if not store.exists(path):
                    continue
                local = os.path.join(tmp, name)
                with open(local, "wb") as f:
                    f.write(store.read_bytes(path))
                client.log_artifact(self.run_id, local)

    def finish(self, ok: bool) -> None:
        """Mark the MLflow run FINISHED or FAILED; a failure to do so is only a warning."""
        try:
            # MLflow prints its own two lines about the run here: the job prints one (where())
            with contextlib.redirect_stdout(io.StringIO()):
                self.client().set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
        except Exception as exc:  # noqa: BLE001 - the stage's own outcome stands
            warnings.warn(f"tracking: could not mark MLflow run {self.run_id} at {self.uri} "
                          f"finished ({type(exc).__name__}: {exc})", FrameDistWarning,
                          stacklevel=2)


def open_run(cfg: Config, store: Store) -> TrackedRun | None:
    """The MLflow run of ``train.run_name`` (None: tracking is off).

    Reuses the run in ``tracking.json`` when it is on the same tracking URI and not deleted
    (a resumed run, the evaluate stage); else creates one in ``tracking.experiment`` named
    ``tracking.run_name`` (default: the train run's name), logs the config as params once and
    records its id.
    """
    uri = tracking_uri(cfg)
    if uri is None:
        return None
    client = _client_class(uri)(tracking_uri=uri)
    name = cfg.train.run_name
    record = TrackingRecord.read(store, name)
    if record is not None and record.uri == uri:
        from mlflow.exceptions import MlflowException

        try:
            if client.get_run(record.run_id).info.lifecycle_stage == "active":
                client.update_run(record.run_id, status="RUNNING")
                return TrackedRun(uri, record.run_id, record.experiment_id)
        except MlflowException:
            pass  # deleted on the server: a new run
    experiment_id = _experiment(client, cfg.tracking.experiment)
    run = client.create_run(experiment_id, run_name=cfg.tracking.run_name or name,
                            tags={"frame-dist.run_name": name,
                                  "frame-dist.n_clips": str(cfg.graph.n_clips)})
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in config_params(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):  # MLflow's batch limit for params
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    TrackingRecord(uri, experiment_id, run.info.run_id).write(store, name)
    return TrackedRun(uri, run.info.run_id, experiment_id, created=True)


def _experiment(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another job
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# --------------------------------------------------------------------------- rank 0, evaluate


class RunLogger:
    """What rank 0 of the train workers logs. Tracking never stops training: the first error
    is one warning on the console, and the logger is off from then on."""

    def __init__(self, run: TrackedRun | None) -> None:
        self.run = run

    def _safely(self, what: str, fn: Any, *args: Any) -> None:
        if self.run is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracking is a convenience, training goes on
            warnings.warn(f"tracking: could not log {what} to MLflow at {self.run.uri} "
                          f"({type(exc).__name__}: {exc}); training goes on without tracking",
                          FrameDistWarning, stacklevel=2)
            self.run = None

    def epoch(self, record: dict[str, Any]) -> None:
        """One epoch's record (loop.EpochRecord dict): ``train/*`` and ``valid/*``."""
        values = {metric_key("train", k): float(record[k]) for k in TRAIN_KEYS if k in record}
        values |= metric_values("valid", record.get("valid") or {})
        self._safely(f"epoch {record['epoch']}", lambda: self.run.log_metrics(
            values, step=int(record["epoch"])))

    def finished(self, test: dict[str, Any], store: Store, run_name: str) -> None:
        """The test metrics of the best weights and the run's files."""
        self._safely("the test metrics", lambda: self.run.log_metrics(
            metric_values("test", test)))
        self._safely("the run's files", lambda: self.run.log_files(store, run_name,
                                                                    TRAIN_FILES))


def log_evaluation(cfg: Config, store: Store, result: dict[str, Any],
                   files: list[str]) -> TrackedRun | None:
    """The evaluate stage's metrics (``evaluate/*``, ``oracle/*``) and ``files`` of the run's
    folder, into the run's MLflow run (created when the run was trained without tracking)."""
    run = open_run(cfg, store)
    if run is None:
        return None
    values = metric_values("evaluate", result.get("model") or {})
    values |= metric_values("oracle", result.get("oracle") or {})
    run.log_metrics(values)
    run.log_files(store, cfg.train.run_name, files)
    run.finish(ok=True)
    return run
