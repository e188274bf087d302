"""End to end on imported features: jobs.import_features, then jobs.pipeline and jobs.sweep.

A copy of the session's ``tiny_ingest`` store (the tiny world, ingested, no features) gets
random frame features (F = 12 on the world's 8-frame grid) through ``jobs.import_features`` (the
function its command line calls), then the whole pipeline runs on the session's local Ray
(extract does nothing, graph, Ray Train, evaluate, score), then a sweep over two N_c. Every run
is on the external features (identity ``external:toy``) and its metrics are finite. The
pipeline's run is the sweep's N_c = 4 run (``imp_nc4``), which the sweep finds finished.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from worlds import GRID, copy_store  # tests/ is on sys.path (pytest)

from feature_store.frames import stored_identity
from frame_dist.evaluate.report import REPORT, SUMMARY, data_identity
from frame_dist.graph.manifest import GraphManifest
from frame_dist.train.artifacts import run_path
from jobs import import_features as import_job
from jobs import pipeline as pipeline_job
from jobs import sweep as sweep_job

RUN = "imp"  # the sweep's runs: imp_nc2, imp_nc4 (the pipeline's)
PIPELINE_RUN = f"{RUN}_nc4"
F = 12
IDENTITY = {"arch": "external", "weights": "external:toy", "grid_size": GRID, "dim": F,
            "kind": "frames"}
METRICS = ("auc", "logloss", "recall@3", "ndcg@3")


@pytest.fixture(scope="module")
def imported(ray_local, tiny_ingest, tmp_path_factory):
    """(store, overrides) after import, pipeline and sweep."""
    _, ingested, overrides = tiny_ingest
    folder = tmp_path_factory.mktemp("imported")
    _, store, overrides = copy_store(ingested, overrides, folder / "store", "train.epochs=2",
                                     "score.kernel=eager")
    ids = store.table("videos").read()["video_id"].to_pylist()
    feats = np.random.default_rng(5).normal(size=(len(ids), GRID, F)).astype(np.float32)
    np.save(folder / "feats.npy", feats)
    (folder / "ids.txt").write_text("\n".join(ids) + "\n")
    overrides += [f"extract.import_path={folder}/feats.npy",
                  f"extract.import_ids={folder}/ids.txt", "extract.import_name=toy"]
    assert import_job.main(overrides) == 0
    assert pipeline_job.main([*overrides, f"train.run_name={PIPELINE_RUN}"]) == 0
    model = store.read_bytes(run_path(PIPELINE_RUN, "model.pt"))
    assert sweep_job.main([*overrides, f"train.run_name={RUN}", "sweep.n_clips=[2, 4]"]) == 0
    assert store.read_bytes(run_path(PIPELINE_RUN, "model.pt")) == model  # not trained again
    return store, overrides


def _finite(metrics: dict) -> None:
    for name in METRICS:
        assert math.isfinite(metrics[name]), (name, metrics)


@pytest.mark.slow
def test_pipeline_on_imported_features(imported):
    store, _ = imported
    assert stored_identity(store) == IDENTITY
    assert store.table("extract_errors").read().num_rows == 0  # nothing was extracted
    metrics = store.read_json(run_path(PIPELINE_RUN, "metrics.json"))
    evaluation = store.read_json(run_path(PIPELINE_RUN, "evaluation.json"))
    _finite(metrics["test"])
    _finite(evaluation["model"])
    _finite(evaluation["oracle"])  # the synthetic world's truth
    assert store.exists(run_path(PIPELINE_RUN, REPORT))
    # the run saw the imported features: F = 12 per clip (ResNet's are 2048), the report's
    # data identity is this store's (its encoder: external:toy)
    assert len(GraphManifest.read(store, 4).feature_mean) == F
    assert store.read_json(run_path(PIPELINE_RUN, SUMMARY))["data"] == data_identity(store)
    scores = store.table("scores").read()
    assert scores.num_rows > 0 and np.isfinite(scores["score"].to_numpy()).all()


@pytest.mark.slow
def test_sweep_on_imported_features(imported):
    store, _ = imported
    summary = store.read_json(f"sweeps/{RUN}/sweep.json")
    assert summary["n_clips"] == [2, 4]
    assert summary["extract"]["done"] == 0  # the imported features, nothing decoded
    for n, row in zip((2, 4), summary["rows"]):
        run = f"{RUN}_nc{n}"
        assert row["run"] == run and row["n_clips"] == n
        evaluation = store.read_json(run_path(run, "evaluation.json"))
        assert row["model"] == evaluation["model"]
        _finite(evaluation["model"])
        assert len(GraphManifest.read(store, n).feature_mean) == F
        assert store.read_json(run_path(run, SUMMARY))["data"] == data_identity(store)
    assert store.exists(f"sweeps/{RUN}/sweep.md")
