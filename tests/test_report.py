"""The run report (frame_dist/evaluate/report.py), written by the evaluate stage (jobs/evaluate.py).

One tiny store for the module: a copy of the session's ``tiny_world`` (tests/conftest.py: the
tiny synthetic world, real ingest, frame features written directly, one random vector per visual
topic plus noise, and its graph), a small FRAME trained by the single-process trainer and saved
with the training stage's own writer, then ``jobs.evaluate`` (evaluation.json + report). The
references are recomputed here: the metrics from evaluation.json, the skip clip from the
interaction's watch ratio (``clip_labels``), the clip scores from a full propagation of the
saved model (``FRAME.embeddings`` + ``FRAME.clip_scores``).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from worlds import copy_store, train_and_save  # tests/ is on sys.path (pytest)

from feature_store.store import Store
from frame_dist.config import load_config
from frame_dist.evaluate.evaluation import load_test_split
from frame_dist.evaluate.report import (
    CASE_PLOT,
    CURVE_PLOT,
    N_CLIPS_PLOT,
    REPORT,
    SUMMARY,
    pick_skip,
    run_summary,
)
from frame_dist.graph.clip_graph import clip_labels
from frame_dist.graph.manifest import GraphManifest
from frame_dist.ingest.interactions import run_ingest
from frame_dist.model.calibration import Calibration
from frame_dist.model.frame import FRAME
from frame_dist.model.metrics import all_metrics, logloss, sigmoid
from frame_dist.train.artifacts import ModelCard, run_dir, run_path
from frame_dist.train.trainer import predict
from frame_dist.train.worker_data import whole_graph
from jobs import evaluate as evaluate_job

RUN = "tiny"
PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def evaluated(tiny_world, tmp_path_factory):
    _, world_store, world_overrides = tiny_world
    cfg, store, overrides = copy_store(world_store, world_overrides,
                                       tmp_path_factory.mktemp("report") / "store",
                                       f"train.run_name={RUN}", "train.epochs=2")
    train_and_save(cfg, store, global_step=4)
    assert evaluate_job.main(overrides) == 0
    return cfg, store, overrides


def _table_row(markdown: str, who: str) -> dict[str, str]:
    """The cells of row ``who`` of the first markdown table with such a row, by header."""
    lines = markdown.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {who} |"))
    start = i
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    header = lines[start]
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in lines[i].strip("|").split("|")]
    return dict(zip(names[1:], cells[1:]))


def test_metrics_in_report_equal_evaluation(evaluated):
    _, store, _ = evaluated
    evaluation = store.read_json(run_path(RUN, "evaluation.json"))
    markdown = store.read_bytes(run_path(RUN, REPORT)).decode()
    assert "oracle" in evaluation  # the synthetic world has the truth
    for who in ("model", "oracle"):
        row = _table_row(markdown, who)
        names = [k for k in evaluation[who] if k not in ("n", "positives", "ranked_users")]
        assert sorted(row) == sorted(names)
        for name in names:
            assert float(row[name]) == pytest.approx(evaluation[who][name], abs=5e-5), name
    assert f"Oracle AUC: **{evaluation['oracle']['auc']:.4f}**" in markdown
    # metrics against N_c: the run alone on its data, one row
    n_clips_row = _table_row(markdown, "4")
    assert n_clips_row["run"] == RUN
    assert float(n_clips_row["auc"]) == pytest.approx(evaluation["model"]["auc"], abs=5e-5)
    # training curve: metrics.json's history
    metrics = store.read_json(run_path(RUN, "metrics.json"))
    assert f"{metrics['epochs_run']} epoch(s), best epoch {metrics['best_epoch']}" in markdown


def test_images_exist_and_are_linked(evaluated):
    _, store, _ = evaluated
    markdown = store.read_bytes(run_path(RUN, REPORT)).decode()
    for name in (N_CLIPS_PLOT, CURVE_PLOT, CASE_PLOT):
        assert f"]({name})" in markdown
        data = store.read_bytes(run_path(RUN, name))
        assert data.startswith(PNG) and data[12:16] == b"IHDR"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 300 and height >= 200
    # nothing half-written left behind (atomic writes rename their temporary files)
    assert not [n for n in store.list_dir(run_dir(RUN)) if ".tmp-" in n]


def test_case_study_skip_clip_and_scores(evaluated):
    cfg, store, _ = evaluated
    case = store.read_json(run_path(RUN, SUMMARY))["case_study"]
    n_clips = cfg.graph.n_clips
    table = store.table("interactions").read().to_pandas()
    row = table[(table["user_id"] == case["user_id"]) & (table["video_id"] == case["video_id"])
                & (table["timestamp"] == case["timestamp"])]
    assert len(row) == 1
    row = row.iloc[0]
    assert row["split"] == "test" and not row["full_watch"]
    assert case["watch_ratio"] == row["watch_ratio"]
    expected_skip = clip_labels(np.array([row["watch_ratio"]]), np.array([False]), n_clips)[0]
    assert case["skip_clip"] == expected_skip
    # the documented choice: the first test skip by (user, video, time) with a played clip
    test = table[(table["split"] == "test") & ~table["full_watch"]].sort_values(
        ["user_id", "video_id", "timestamp"])
    watched = clip_labels(test["watch_ratio"].to_numpy(), np.zeros(len(test), bool), n_clips)
    first = test[watched > 0].iloc[0]
    assert (case["user_id"], case["video_id"]) == (first["user_id"], first["video_id"])
    markdown = store.read_bytes(run_path(RUN, REPORT)).decode()
    assert f"skipped in clip s = floor(r N_c) = {expected_skip}" in markdown

    # scores: the saved model, one full propagation, FRAME.clip_scores of the pair
    saved = torch.load(store.path(run_path(RUN, "model.pt")), weights_only=True)
    model = FRAME(**saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    data, manifest = whole_graph(store, n_clips)
    user = data.user_ids.to_pylist().index(case["user_id"])  # whole graph: row = user
    video = int(np.flatnonzero(data.video_ids == manifest.video_ids.index(case["video_id"]))[0])
    with torch.no_grad():
        h_c, h_u_pos, h_u_neg = model.embeddings(data.clip_features, data.graph)
        expected = model.clip_scores(h_u_pos[user], h_u_neg[user],
                                     h_c.view(-1, n_clips, model.dim)[video])  # (N_c,)
    assert len(case["clip_scores"]) == n_clips
    np.testing.assert_allclose(case["clip_scores"], expected.numpy(), atol=1e-5, rtol=0)
    assert case["video_score"] == pytest.approx(float(expected.mean()), abs=1e-5)


def test_model_card_after_evaluation(evaluated):
    """The evaluate stage rewrites the card with evaluation.json's metrics and the oracle's."""
    cfg, store, _ = evaluated
    evaluation = store.read_json(run_path(RUN, "evaluation.json"))
    text = store.read_bytes(run_path(RUN, ModelCard.FILE)).decode()
    header = ModelCard.parse_header(text)
    assert header["n_clips"] == cfg.graph.n_clips
    assert header["data_fingerprint"] == GraphManifest.read(store, cfg.graph.n_clips).fingerprint
    assert header["metrics"]["model"] == evaluation["model"]
    assert header["metrics"]["oracle"] == evaluation["oracle"]
    best = max(evaluation["baselines"], key=lambda k: evaluation["baselines"][k]["auc"])
    assert header["metrics"]["baselines"] == {"name": best, **evaluation["baselines"][best]}
    assert f"| best baseline ({best}) | {evaluation['baselines'][best]['auc']:.4f} |" in text
    assert f"| oracle | {evaluation['oracle']['auc']:.4f} |" in text
    saved = torch.load(store.path(run_path(RUN, "model.pt")), weights_only=True)
    command = shlex.split(header["reproduce"])
    assert load_config(None, command[3:]).to_dict() == saved["config"]


def test_oracle_from_an_ingested_truth_column(evaluated, tmp_path):
    """Data carrying its own truth (ingest.truth_column) gets the oracle row: the world's log
    with p_full as a column, ingested into a copy of the store that has no truth table."""
    _, store, overrides = evaluated
    cfg, copy, overrides = copy_store(store, overrides, tmp_path / "store", ignore=("truth",))
    assert not copy.table("truth").exists()
    world_log = store.table("interactions").metadata()["source"]
    videos = store.table("videos").metadata()["source"]
    log = pd.read_csv(world_log, dtype={"user_id": str, "video_id": str})
    truth = store.table("truth").read().to_pandas()
    log = log.merge(truth, on=["user_id", "video_id", "timestamp"], how="left")
    assert log["p_full"].notna().all()
    source = tmp_path / "log_with_truth.csv"
    log.to_csv(source, index=False)
    overrides = [*overrides, f"ingest.interactions={source}", f"ingest.videos={videos}",
                 "ingest.truth_column=p_full"]
    run_ingest(load_config(None, overrides), copy)
    assert copy.table("truth").metadata()["column"] == "p_full"
    assert evaluate_job.main(overrides) == 0
    result = copy.read_json(run_path(RUN, "evaluation.json"))
    expected = store.read_json(run_path(RUN, "evaluation.json"))
    assert result["model"] == pytest.approx(expected["model"], abs=1e-9)
    assert result["oracle"] == pytest.approx(expected["oracle"], abs=1e-9)
    markdown = copy.read_bytes(run_path(RUN, REPORT)).decode()
    assert f"Oracle AUC: **{expected['oracle']['auc']:.4f}**" in markdown
    assert ModelCard.read_header(copy, RUN)["metrics"]["oracle"] == result["oracle"]


def test_pick_skip_without_a_skip_or_a_played_clip():
    import pandas as pd

    rows = pd.DataFrame({"user_id": ["b", "a", "a"], "video_id": ["v", "w", "v"],
                         "timestamp": [1, 2, 3], "watch_ratio": [0.1, 1.0, 0.2],
                         "full_watch": [False, True, False]})
    users = np.array([0, 1, 1])
    assert pick_skip(rows, users, 4) == 2  # no skip after a played clip: the first skip (a, v)
    assert pick_skip(rows, users, 2) == 2
    rows.loc[0, "watch_ratio"] = 0.6  # b played 2 clips of 4 before skipping
    assert pick_skip(rows, users, 4) == 0
    assert pick_skip(rows[rows["full_watch"]], users[1:2], 4) is None


def test_second_run_on_the_same_data_joins_the_n_clips_table(evaluated, tmp_path, capsys):
    _, store, overrides = evaluated
    root = tmp_path / "store"
    shutil.copytree(store.path(), root)
    copy = Store(str(root))
    shutil.copytree(root / run_dir(RUN), root / run_dir("other"))
    rc = evaluate_job.main([*overrides, f"store.root={root}", "train.run_name=other"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"report: {copy.uri(run_path('other', REPORT))}"
    assert lines[-3].startswith("| model |") and lines[-2].startswith("| oracle |")
    markdown = copy.read_bytes(run_path("other", REPORT)).decode()
    assert "same data (2 run(s))" in markdown
    assert f"| 4 | {RUN} |" in markdown and "| 4 | other |" in markdown


def test_report_on_an_s3_store(evaluated, s3_server):
    """The same report, written through the store API to an S3-compatible server."""
    _, store, overrides = evaluated
    bucket = s3_server.bucket()
    local = Path(store.path())
    for path in sorted(local.rglob("*")):  # the store without the run's report
        rel = path.relative_to(local).as_posix()
        if path.is_file() and not rel.startswith(run_path(RUN, "report")):
            s3_server.client.put_object(Bucket=bucket, Key=f"store/{rel}",
                                        Body=path.read_bytes())
    rc = evaluate_job.main([*overrides, f"store.root=s3://{bucket}/store",
                            f"store.endpoint_url={s3_server.endpoint_url}"])
    assert rc == 0
    objects = s3_server.objects(bucket)
    prefix = f"store/{run_dir(RUN)}/"
    assert objects[prefix + REPORT] == store.read_bytes(run_path(RUN, REPORT))
    for name in (N_CLIPS_PLOT, CURVE_PLOT, CASE_PLOT):
        assert objects[prefix + name].startswith(PNG)
    assert not [key for key in objects if ".tmp-" in key]


def test_run_summary_ends_the_pipeline_with_table_and_report(evaluated):
    _, store, _ = evaluated
    evaluation = store.read_json(run_path(RUN, "evaluation.json"))
    lines = run_summary(store, RUN).splitlines()
    names = ("auc", "logloss", "logloss_raw", "recall@3", "ndcg@3", "recall@5", "ndcg@5")
    assert lines[0] == "| | " + " | ".join(names) + " |"
    assert lines[2] == "| model | " + " | ".join(
        f"{evaluation['model'][k]:.4f}" for k in names) + " |"
    assert lines[3].startswith("| oracle |")
    assert lines[-1] == f"report: {store.uri(run_path(RUN, REPORT))}"
    assert run_summary(store, "missing").startswith("run missing: not evaluated yet")


def test_evaluation_applies_the_stored_calibration(evaluated):
    """Train -> evaluate on the tiny world: the calibration fitted on the validation split
    lowers its Logloss (true by construction), is stored in model.pt and metrics.json, and is
    the one evaluate applies to the test logits; AUC and the ranking metrics ignore it."""
    cfg, store, _ = evaluated
    metrics = store.read_json(run_path(RUN, "metrics.json"))
    evaluation = store.read_json(run_path(RUN, "evaluation.json"))
    saved = torch.load(store.path(run_path(RUN, "model.pt")), weights_only=True)
    assert metrics["valid"]["logloss"] <= metrics["valid"]["logloss_raw"]
    assert saved["calibration"] == metrics["calibration"] == evaluation["calibration"]
    cal = Calibration.from_dict(saved["calibration"])
    assert not cal.is_identity
    test = load_test_split(store, RUN)
    assert test.calibration == cal
    labels = test.rows["full_watch"].to_numpy().astype(np.int64)
    logits = predict(test.model, test.data.clip_features, test.data.graph, test.users,
                     test.videos)
    model = evaluation["model"]
    assert model["logloss"] == pytest.approx(logloss(labels, cal.apply(logits)), abs=1e-9)
    assert model["logloss_raw"] == pytest.approx(logloss(labels, sigmoid(logits)), abs=1e-9)
    raw = all_metrics(test.users, labels, logits, cfg.evaluate.ks)
    for key in ("auc", "recall@3", "ndcg@3", "recall@5", "ndcg@5"):
        assert model[key] == pytest.approx(raw[key], abs=1e-12), key
    markdown = store.read_bytes(run_path(RUN, REPORT)).decode()
    assert f"calibration a = {cal.a:.4g}, b = {cal.b:.4g}" in markdown
    case = store.read_json(run_path(RUN, SUMMARY))["case_study"]
    assert case["probability"] == pytest.approx(float(cal.apply(np.array(
        [case["video_score"]]))[0]), abs=1e-9)
    assert ModelCard.read_header(store, RUN)["calibration"] == evaluation["calibration"]


def test_evaluation_reports_counting_baselines_on_the_same_rows(evaluated):
    """Constant, user rate and video rate in evaluation.json, computed from the store's own
    split: the constant is the training full-watch rate (AUC 1/2, Logloss by hand)."""
    cfg, store, _ = evaluated
    evaluation = store.read_json(run_path(RUN, "evaluation.json"))
    baselines = evaluation["baselines"]
    assert set(baselines) == {"constant", "user rate", "video rate"}
    table = store.table("interactions").read().to_pandas()
    rate = table.loc[table.split == "train", "full_watch"].mean()
    test = table.loc[table.split == "test", "full_watch"].to_numpy()
    assert baselines["constant"]["auc"] == 0.5
    assert baselines["constant"]["logloss"] == pytest.approx(logloss(test, np.full(len(test),
                                                                                  rate)))
    assert baselines["user rate"]["n"] == evaluation["model"]["n"]
