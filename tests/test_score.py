"""Batch scoring (frame_dist/score/{kernel,pipeline}.py, jobs/score.py): top-K lists of every user.

One tiny store, the session's ``score_world`` (tests/conftest.py, built with tests/worlds.py):
the tiny synthetic world (real ingest), frame features written directly (one random vector per
visual topic plus noise), with three edits that give every edge case a user: two users lose
their training rows (cold users: only test rows), a ``ghost`` user watched only a video that
has no frame features (absent from the graph), and that video is therefore not a candidate. A
small FRAME is trained with the single-process trainer and saved as ``runs/tiny/model.pt`` by
the training stage's own writer.

The reference is the model's own forward pass (``FRAME.score_pairs`` on the merged shards, in
the graph's local spaces) for every (user, video) pair, sorted per user. The graph has two
shards, so every job run here computes its embeddings with one Ray task per shard
(``frame_dist.score.embeddings.sharded_embeddings``); a copy with three shards and a video nobody
watched compares that path with the single-process one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from worlds import (  # tests/ is on sys.path (pytest)
    COLD,
    GHOST,
    GRID,
    SCORE_RUN,
    TOL,
    assert_same_lists,
    fresh_copy,
    naive_top_k,
    top_k_lists,
)

from feature_store.frames import (
    commit_frame_parts,
    frame_features_table,
    stored_identity,
    write_frame_part,
)
from feature_store.schemas import SCORES
from feature_store.store import Store, StoreError
from frame_dist.config import ConfigError, load_config
from frame_dist.graph.shards import (
    build_shards,
    read_graph_manifest,
    read_graph_user_ids,
)
from frame_dist.model.calibration import Calibration
from frame_dist.model.frame import FRAME
from frame_dist.score.embeddings import sharded_embeddings, whole_graph_embeddings
from frame_dist.score.kernel import FusedScorer, fuse_tables
from frame_dist.score.pipeline import (
    CHUNK_SCHEMA,
    FAULT_ENV,
    SCORES_TABLE,
    ScoreError,
    chunk_tables,
    prepare_scoring,
    read_scores,
    run_scoring,
    top_k_table,
)
from frame_dist.train.artifacts import SavedModel, run_path
from frame_dist.train.worker_data import whole_graph
from jobs import score as score_job

REPO = Path(__file__).resolve().parents[1]
RUN = SCORE_RUN
UNWATCHED = "zz-unwatched"  # three_shards: frame features, no interaction


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(score_world):
    """The score world of tests/conftest.py (``score_world``): clean_run commits its scores."""
    return score_world


@pytest.fixture(scope="module")
def reference(score_reference):
    """Every (user, video) score by the model's forward pass, and the training pairs."""
    return score_reference


def _n_chunks(store: Store, users_per_chunk: int = 5) -> int:
    """Chunks of the run: each shard's users cut into chunks of ``users_per_chunk``."""
    shards = read_graph_manifest(store, 4).shards
    return sum(-(-s.users // users_per_chunk) for s in shards)


@pytest.fixture(scope="module")
def clean_run(world, ray_local):
    """score.top_k=3, exclude_seen, users_per_chunk=5 on the module's store."""
    cfg, store, _, _ = world
    summary = run_scoring(cfg, store)
    return summary, read_scores(store)


# --------------------------------------------------------------------------- kernel (no Ray)


def _fused_case(use_negative: bool, aggregation: str, n_c: int, n_users: int = 11,
                n_videos: int = 7):
    """A small FRAME's fused tables and its own ``score_block`` (n_users, n_videos)."""
    torch.manual_seed(0)
    model = FRAME(8, dim=6, hidden=5, a_pos=1.0, a_neg=0.3, use_negative=use_negative,
                  aggregation=aggregation).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases, so b_1 and c of eq. 11 are exercised
            p.add_(0.3 * torch.randn_like(p))
    h_c = torch.randn(n_videos * n_c, 6)
    h_u_pos, h_u_neg = torch.relu(torch.randn(n_users, 6)), torch.relu(torch.randn(n_users, 6))
    h_u_pos[4] = 0  # a cold user: Z_u = 0
    h_u_neg[4] = 0
    tables = fuse_tables(model, h_c, h_u_pos, h_u_neg if use_negative else None, n_c)
    assert tables.user_table.shape == (n_users, 5 * (2 if use_negative else 1))
    assert torch.equal(tables.user_table[4], torch.zeros(tables.user_table.shape[1]))
    assert tables.aggregation == aggregation
    with torch.no_grad():
        expected = model.score_block(h_u_pos, h_u_neg, h_c.view(n_videos, n_c, 6))  # (U, V)
    return tables, expected


def _check_fused_scorer(scorer: FusedScorer, tables, expected: torch.Tensor) -> None:
    """Scores, a range of videos and the top-k with seen pairs equal ``score_block``'s."""
    n_users, n_videos = expected.shape
    torch.testing.assert_close(scorer.scores(tables.user_table), expected, atol=TOL, rtol=0)
    torch.testing.assert_close(scorer.scores(tables.user_table, 2, 5), expected[:, 2:5],
                               atol=TOL, rtol=0)

    seen = (torch.tensor([0, 0, 5]), torch.tensor([1, 6, 0]))  # user 0: videos 1, 6; 5: 0
    values, positions = scorer.top_k(tables.user_table, 4, seen)
    masked = expected.clone()
    masked[seen] = -torch.inf
    top = torch.topk(masked, 4, dim=1)
    torch.testing.assert_close(values, top.values, atol=TOL, rtol=0)
    assert torch.equal(positions, top.indices)
    # k above the candidate count: every video, the excluded ones as -inf at the end
    values, positions = scorer.top_k(tables.user_table, n_videos + 43, seen)
    assert values.shape == (n_users, n_videos)
    assert torch.isinf(values[0]).sum() == 2 and torch.isinf(values[5]).sum() == 1
    assert sorted(positions[1].tolist()) == list(range(n_videos))


@pytest.mark.parametrize("n_c", [1, 3, 4])
@pytest.mark.parametrize("aggregation", ["mean", "survival"])
@pytest.mark.parametrize("use_negative", [True, False])
def test_fused_scorer_equals_model_score_block(use_negative, aggregation, n_c) -> None:
    tables, expected = _fused_case(use_negative, aggregation, n_c)
    # a tiny tile budget forces several user and video tiles and partial edge tiles
    scorer = FusedScorer(tables.clip_thresholds, tables.out_weight, tables.out_bias,
                         aggregation=tables.aggregation, videos_per_block=3)
    scorer.user_tile, scorer.video_tile = 4, 2
    _check_fused_scorer(scorer, tables, expected)


@pytest.mark.slow
@pytest.mark.parametrize("n_c", [1, 4])
@pytest.mark.parametrize("aggregation", ["mean", "survival"])
def test_compiled_kernel_equals_model_score_block(aggregation, n_c) -> None:
    """The compiled kernel: 140 users (a partial second tile of 128), 45 videos (N_c = 4:
    tiles of 16, the last partial); padded users and videos are sliced off."""
    tables, expected = _fused_case(True, aggregation, n_c, n_users=140, n_videos=45)
    scorer = FusedScorer(tables.clip_thresholds, tables.out_weight, tables.out_bias,
                         aggregation=tables.aggregation, kernel="compiled", videos_per_block=20)
    _check_fused_scorer(scorer, tables, expected)
    assert scorer.kernel == "compiled"  # it compiled, no fallback to eager


def test_fused_scorer_refuses_an_unknown_aggregation() -> None:
    with pytest.raises(ValueError, match="aggregation='max' must be one of"):
        FusedScorer(torch.zeros(2, 1, 3), torch.zeros(3), 0.0, aggregation="max")


@pytest.mark.slow
def test_compiled_kernel_equals_eager() -> None:
    """torch.compile's fused loop (the default for large CPU runs) against the eager kernel."""
    g = torch.Generator().manual_seed(1)
    t_c = torch.randn(45, 4, 24, generator=g)  # 45 videos: a partial last tile of 32 / 4
    w = torch.randn(24, generator=g)
    z_u = torch.randn(70, 24, generator=g)  # 70 users: a partial last user tile of 32
    eager = FusedScorer(t_c, w, 0.25)
    compiled = FusedScorer(t_c, w, 0.25, kernel="compiled", videos_per_block=20)
    reference = (torch.relu(z_u[:, None, None] - t_c[None]) @ w).sum(-1) + 0.25
    torch.testing.assert_close(eager.scores(z_u), reference, atol=TOL, rtol=0)
    torch.testing.assert_close(compiled.scores(z_u, 3, 41), reference[:, 3:41], atol=TOL,
                               rtol=0)
    values, positions = compiled.top_k(z_u, 5)
    assert compiled.kernel == "compiled"  # it compiled, no fallback to eager
    top = torch.topk(reference, 5, dim=1)
    torch.testing.assert_close(values, top.values, atol=TOL, rtol=0)
    assert torch.equal(positions, top.indices)


def test_chunk_table_cuts_users_and_their_seen_pairs() -> None:
    """Chunk first_chunk + b = users b * U .. (b + 1) * U - 1; seen rows relative to it."""
    z_u = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)  # 7 users, G = 3
    ids = [f"u{i}" for i in range(7)]
    seen = (np.array([6, 0, 3, 0, 4]), np.array([2, 5, 1, 1, 0]))  # unsorted (row, position)
    tables = list(chunk_tables(ids, z_u, seen, users_per_chunk=3, first_chunk=10))
    assert [t.num_rows for t in tables] == [1, 1, 1] and tables[0].schema == CHUNK_SCHEMA
    rows = pa.concat_tables(tables).to_pylist()
    assert [r["chunk"] for r in rows] == [10, 11, 12]
    assert [r["user_ids"] for r in rows] == [ids[0:3], ids[3:6], ids[6:7]]
    for r, first in zip(rows, (0, 3, 6)):
        got = np.frombuffer(r["user_table"], np.float32).reshape(-1, 3)
        np.testing.assert_array_equal(got, z_u[first:first + len(r["user_ids"])])
    pairs = [list(zip(np.frombuffer(r["seen_rows"], np.int64).tolist(),
                      np.frombuffer(r["seen_positions"], np.int64).tolist())) for r in rows]
    assert pairs == [[(0, 1), (0, 5)], [(0, 1), (1, 0)], [(0, 2)]]
    # only the chunks still to score; none without a seen list
    tables = chunk_tables(ids, z_u, None, 3, first_chunk=10, todo=np.array([12, 10, 99]))
    assert [t["chunk"][0].as_py() for t in tables] == [10, 12]
    assert not list(chunk_tables(ids, z_u, None, 3, 10, todo=np.array([], np.int64)))
    # objects of at least min_bytes (Ray returns smaller ones inline to the driver): chunks 10
    # and 11 count 3 x 3 x 4 B of Z_u + 3 ids x (2 + 4) B + 2 seen pairs x 16 B = 86 B each,
    # so 100 B gives runs of two chunks
    grouped = list(chunk_tables(ids, z_u, seen, 3, first_chunk=10, min_bytes=100))
    assert [t["chunk"].to_pylist() for t in grouped] == [[10, 11], [12]]
    assert pa.concat_tables(grouped).equals(pa.concat_tables(tables_all := list(
        chunk_tables(ids, z_u, seen, 3, first_chunk=10))))
    assert len(tables_all) == 3


def test_top_k_rows_carry_the_calibrated_probability() -> None:
    """SCORES rows: the logit as ``score`` and P(full watch) = sigmoid(a score + b) beside it;
    a user's -inf entries (no candidate left) are dropped."""
    values = np.array([[2.0, -0.5, -np.inf], [0.25, -np.inf, -np.inf]], np.float32)
    positions = np.array([[1, 0, 0], [2, 0, 0]])
    users, videos = pa.array(["a", "b"]), pa.array(["v0", "v1", "v2"])
    table = top_k_table(users, values, positions, videos, Calibration(0.5, -1.0))
    assert table.schema == SCORES and table.num_rows == 3
    assert table["video_id"].to_pylist() == ["v1", "v0", "v2"]
    scores = np.array([2.0, -0.5, 0.25])
    np.testing.assert_allclose(table["score"].to_numpy(), scores)
    np.testing.assert_allclose(table["probability"].to_numpy(),
                               1 / (1 + np.exp(-(0.5 * scores - 1.0))), rtol=1e-6)
    plain = top_k_table(users, values, positions, videos)  # no calibration: sigmoid(score)
    np.testing.assert_allclose(plain["probability"].to_numpy(), 1 / (1 + np.exp(-scores)),
                               rtol=1e-6)


# --------------------------------------------------------------------------- the job (Ray)


@pytest.mark.slow
def test_top_k_equals_brute_force_forward(world, reference, clean_run) -> None:
    summary, table = clean_run
    _, _, users, videos = reference
    assert GHOST not in users and world[3] not in videos  # absent from the graph
    _, store, _, _ = world
    # the default aggregation end to end: the job's survival kernel against score_pairs
    assert SavedModel.read(store, RUN).model_args["aggregation"] == "survival"
    assert summary.users == len(users) == 24 and summary.candidates == len(videos) == 9
    assert [s.users for s in read_graph_manifest(store, 4).shards] == [12, 12]
    assert summary.chunks == summary.scored_chunks == _n_chunks(store) == 6  # 3 per shard
    assert summary.skipped_chunks == 0
    assert summary.cold_users == len(COLD)
    got = top_k_lists(table)
    expected = naive_top_k(reference, 3, exclude_seen=True)
    assert_same_lists(got, expected)
    assert table.num_rows == sum(len(v) for v in expected.values()) == summary.rows
    assert any(len(v) < 3 for v in expected.values())  # users who saw 7 of the 9 videos
    # no training pair is recommended
    _, seen, _, _ = reference
    assert not {(u, v) for u, lst in got.items() for v, _ in lst} & seen
    # cold users: K rows from the clip side alone, so the same list for both
    assert len(got[COLD[0]]) == 3
    assert_same_lists({COLD[1]: got[COLD[1]]}, {COLD[1]: got[COLD[0]]})


@pytest.mark.slow
def test_manifest_identity_and_parts(world, clean_run) -> None:
    _, store, _, _ = world
    table = store.table(SCORES_TABLE)
    meta = table.metadata()
    assert meta["complete"] is True and meta["chunks"] == meta["chunks_committed"] == 6
    identity = meta["identity"]
    assert identity["run"] == RUN and identity["top_k"] == 3
    assert identity["exclude_seen"] is True and identity["candidates"] == "all"
    assert len(identity["model_sha256"]) == 64
    chunks = sorted(c for p in table.parts() for c in p.meta["chunks"])
    assert chunks == [0, 1, 2, 3, 4, 5]  # each chunk in exactly one part
    assert store.exists("tables", SCORES_TABLE, "config.yaml")


@pytest.mark.slow
def test_probability_column_uses_the_runs_calibration(world, clean_run) -> None:
    _, store, _, _ = world
    _, table = clean_run
    cal = SavedModel.read(store, RUN).calibration
    assert not cal.is_identity  # fitted on the world's validation split
    assert store.table(SCORES_TABLE).metadata()["identity"]["calibration"] == cal.to_dict()
    np.testing.assert_allclose(table["probability"].to_numpy(),
                               cal.apply(table["score"].to_numpy()), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_driver_receives_the_clip_side_only(world, ray_local) -> None:
    """The shard tasks send the driver their clip partials and nothing per user; the users'
    chunk rows stay in the object store and equal Z_u of the single-process embeddings."""
    import ray

    cfg, store, _, _ = world
    inputs = prepare_scoring(cfg, store, done={1, 4})
    manifest = read_graph_manifest(store, 4)
    d = 16
    clips = [s.videos * 4 for s in manifest.shards]
    assert inputs.bytes_from_tasks == sum(c * 8 + 3 * c * d * 4 for c in clips)
    assert len(inputs.user_chunks) == 2  # tiny chunks: one object per shard, >= 256 KiB or all
    assert all(isinstance(r, ray.ObjectRef) for r in inputs.user_chunks)
    assert inputs.n_users == 24 and inputs.cold_users == len(COLD) and inputs.n_chunks == 6
    rows = pa.concat_tables(ray.get(inputs.user_chunks)).to_pylist()
    assert sorted(r["chunk"] for r in rows) == [0, 2, 3, 5]  # not the chunks already done

    model = _model_variant("trained", store, 0)
    single = whole_graph_embeddings(model, store, 4)
    tables = fuse_tables(model, single.h_c, single.h_u_pos, single.h_u_neg, 4)
    torch.testing.assert_close(inputs.clip_side.clip_thresholds, tables.clip_thresholds,
                               atol=TOL, rtol=0)
    assert torch.equal(inputs.clip_side.out_weight, tables.out_weight)
    assert inputs.clip_side.aggregation == tables.aggregation == model.aggregation
    row_of = {u: i for i, u in enumerate(read_graph_user_ids(store, manifest).to_pylist())}
    seen = {(int(u), int(v)) for u, v in zip(single.train_users, single.train_videos)}
    for r in rows:
        users = [row_of[u] for u in r["user_ids"]]
        z_u = np.frombuffer(r["user_table"], np.float32).reshape(len(users), -1)
        np.testing.assert_allclose(z_u, tables.user_table[users].numpy(), atol=TOL, rtol=0)
        got = {(users[i], int(p)) for i, p in zip(np.frombuffer(r["seen_rows"], np.int64),
                                                  np.frombuffer(r["seen_positions"], np.int64))}
        assert got == {(u, v) for u, v in seen if u in set(users)}  # all videos: position = v


@pytest.mark.slow
def test_rerun_is_skipped_and_new_identity_starts_over(world, reference, clean_run, tmp_path):
    cfg, store, overrides = fresh_copy(world, tmp_path)
    shutil.copytree(world[1].path("tables", SCORES_TABLE), store.path("tables", SCORES_TABLE))
    version = store.table(SCORES_TABLE).manifest()["version"]
    again = run_scoring(cfg, store)
    assert again.scored_chunks == 0 and again.skipped_chunks == 6
    assert again.kernel == "-" and again.users == 24 and again.rows == clean_run[0].rows
    assert store.table(SCORES_TABLE).manifest()["version"] == version  # nothing committed
    # a driver killed between its last chunk and the final commit: only the mark is missing
    store.table(SCORES_TABLE).commit([], {"complete": False})
    assert run_scoring(cfg, store).scored_chunks == 0
    assert store.table(SCORES_TABLE).metadata()["complete"] is True
    assert len(store.table(SCORES_TABLE).parts()) == 6

    # another K and no exclusion: the old result set is replaced, not mixed
    cfg = load_config(None, [*overrides, "score.top_k=50", "score.exclude_seen=false",
                             "score.actors=1"])
    summary = run_scoring(cfg, store)
    assert summary.started_over and summary.scored_chunks == 6
    got = top_k_lists(read_scores(store))
    assert_same_lists(got, naive_top_k(reference, 50, exclude_seen=False))
    assert all(len(lst) == 9 for lst in got.values())  # K > candidates: all 9 videos
    assert store.table(SCORES_TABLE).metadata()["identity"]["top_k"] == 50
    assert len(store.table(SCORES_TABLE).parts()) == 6
    _, seen, _, _ = reference
    assert {(u, v) for u, lst in got.items() for v, _ in lst} >= seen  # seen ones included

    # K > candidates with the exclusion: everything but the user's training videos
    cfg = load_config(None, [*overrides, "score.top_k=50", "score.kernel=auto",
                             "score.actors=1"])
    assert run_scoring(cfg, store).kernel == "eager"  # "auto", tiny: no compile
    got = top_k_lists(read_scores(store))
    assert_same_lists(got, naive_top_k(reference, 50, exclude_seen=True))
    assert len(got[COLD[0]]) == 9 and min(len(v) for v in got.values()) < 9


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_candidates_file_restricts_the_videos(world, reference, ray_local, tmp_path, fmt):
    _, _, _, videos = reference
    chosen = [videos[1], videos[4], videos[7], videos[8]]
    path = tmp_path / f"candidates.{fmt}"
    table = pa.table({"video_id": chosen + [videos[4]], "why": list("abcde")})  # a duplicate
    if fmt == "csv":
        path.write_text("video_id,why\n" + "\n".join(f"{v},x" for v in table["video_id"]
                                                    .to_pylist()) + "\n")
    else:
        pq.write_table(table, path)
    cfg, store, _ = fresh_copy(world, tmp_path, f"score.candidates={path}", "score.top_k=3",
                           "score.actors=1")
    summary = run_scoring(cfg, store)
    assert summary.candidates == 4
    got = top_k_lists(read_scores(store))
    assert_same_lists(got, naive_top_k(reference, 3, True, candidates=set(chosen)))
    assert {v for lst in got.values() for v, _ in lst} <= set(chosen)
    identity = store.table(SCORES_TABLE).metadata()["identity"]
    assert identity["candidates"]["path"] == str(path)


@pytest.mark.slow
def test_bad_candidates_and_missing_run_are_refused(world, tmp_path, capsys) -> None:
    _, _, overrides, no_features = world
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"video_id": ["nope", no_features]}), bad)
    cfg, store, _ = fresh_copy(world, tmp_path, f"score.candidates={bad}")
    with pytest.raises(ScoreError, match=r"2 row\(s\) with a video_id not in the id map"):
        prepare_scoring(cfg, store)
    pq.write_table(pa.table({"video": ["v"]}), tmp_path / "nocol.parquet")
    assert score_job.main([*overrides, f"score.candidates={tmp_path}/nocol.parquet"]) == 2
    assert "score.candidates=" in capsys.readouterr().err
    assert score_job.main([*overrides, f"score.candidates={tmp_path}/missing.csv"]) == 2
    assert "missing.csv': no such file" in capsys.readouterr().err
    assert score_job.main([*overrides, "train.run_name=never-trained"]) == 1
    err = capsys.readouterr().err
    assert "stage score failed: StoreError: no trained model at" in err
    with pytest.raises(StoreError, match="run the train stage first"):
        prepare_scoring(load_config(None, [*overrides, "train.run_name=x"]), store)


@pytest.mark.slow
def test_killed_driver_resumes_to_the_clean_result(world, clean_run, ray_local, tmp_path,
                                                   capsys) -> None:
    _, clean = clean_run
    cfg, store, _ = fresh_copy(world, tmp_path)
    cfg.save(tmp_path / "config.yaml")
    env = dict(os.environ, **{FAULT_ENV: "1"},
               RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, "-m", "jobs.score", "--config",
                           str(tmp_path / "config.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "killing the driver after commit 1" in proc.stderr
    table = store.table(SCORES_TABLE)
    done = {c for p in table.parts() for c in p.meta["chunks"]}
    assert 0 < len(done) < 6
    assert table.metadata()["complete"] is False
    partial, whole = top_k_lists(table.read()), top_k_lists(clean)
    assert 0 < len(partial) < len(whole)
    assert_same_lists(partial, {u: whole[u] for u in partial})  # committed users: whole

    assert score_job.main(["--config", str(tmp_path / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"{6 - len(done)} chunks scored, {len(done)} skipped (already committed)" in out
    final = read_scores(store)
    chunks = [c for p in table.parts() for c in p.meta["chunks"]]
    assert sorted(chunks) == [0, 1, 2, 3, 4, 5]  # exactly one committed part per chunk
    assert final.num_rows == clean.num_rows
    assert final.select(["user_id", "rank", "video_id"]).equals(
        clean.select(["user_id", "rank", "video_id"]))
    np.testing.assert_allclose(final["score"].to_numpy(), clean["score"].to_numpy(), atol=1e-6)
    assert table.metadata()["complete"] is True
    # parts staged by the killed driver but never committed are invisible; vacuum removes them
    table.vacuum()
    assert len(store.fs.ls(store.path("tables", SCORES_TABLE, "parts"))) == len(table.parts())
    assert table.metadata()["identity"] == world[1].table(SCORES_TABLE).metadata()["identity"]


@pytest.mark.slow
def test_scores_on_an_s3_store(world, clean_run, ray_local, s3_server) -> None:
    """The job on an S3-compatible store: shard tasks read the graph and the features there,
    actors write their parts there, the driver commits; the same lists as on local disk."""
    _, store, overrides, _ = world
    bucket = s3_server.bucket()
    local = Path(store.path())
    for path in sorted(local.rglob("*")):  # the store without its scores table
        rel = path.relative_to(local).as_posix()
        if path.is_file() and not rel.startswith(f"tables/{SCORES_TABLE}"):
            s3_server.client.put_object(Bucket=bucket, Key=f"store/{rel}",
                                        Body=path.read_bytes())
    remote = [*overrides, f"store.root=s3://{bucket}/store",
              f"store.endpoint_url={s3_server.endpoint_url}"]
    assert score_job.main(remote) == 0
    cfg = load_config(None, remote)
    got = read_scores(Store.from_config(cfg.store))
    clean = clean_run[1]
    assert got.select(["user_id", "rank", "video_id"]).equals(
        clean.select(["user_id", "rank", "video_id"]))
    np.testing.assert_allclose(got["score"].to_numpy(), clean["score"].to_numpy(), atol=1e-6)
    objects = s3_server.objects(bucket)
    parts = [k for k in objects if k.startswith(f"store/tables/{SCORES_TABLE}/parts/")]
    assert len(parts) == 6 and not [k for k in objects if ".tmp-" in k]


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("override, message", [
    ("score.kernel=fast", "score.kernel='fast' must be one of ['auto', 'eager', 'compiled']"),
    ("score.actors=-1", "score.actors=-1 must be >= 0 (0: one per GPU, else one per CPU)"),
    ("score.actors=two", "score.actors must be an integer, got 'two'"),
    ("score.videos_per_block=0", "score.videos_per_block=0 must be > 0"),
    ("score.shard_task_cpus=0", "score.shard_task_cpus=0.0 must be > 0"),
    ("score.users_per_chunk=0", "score.users_per_chunk=0 must be > 0"),
])
def test_invalid_score_settings_name_the_field(override, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_score_settings_from_the_command_line(tmp_path) -> None:
    cfg = load_config(None, ["score.kernel=compiled", "score.actors=2",
                             "score.videos_per_block=512", "score.shard_task_cpus=0.5"])
    s = cfg.score
    assert (s.kernel, s.actors, s.videos_per_block, s.shard_task_cpus) == (
        "compiled", 2, 512, 0.5)
    default = load_config().score
    assert (default.kernel, default.actors, default.videos_per_block) == ("auto", 0, 4096)
    cfg.save(tmp_path / "resolved.yaml")  # the resolved config beside the table loads back
    assert load_config(tmp_path / "resolved.yaml") == cfg


# --------------------------------------------------------------------------- sharded embeddings


def _add_unwatched_video(store: Store, video_id: str) -> None:
    """Frame features for a video without any interaction (a candidate from its looks alone)."""
    rng = np.random.default_rng(3)
    times = (np.arange(GRID)[None] + 0.5) / GRID  # (1, G)
    feats = (5 + rng.normal(size=(1, GRID, 2048))).astype(np.float32)  # (1, G, 2048)
    part = write_frame_part(store, frame_features_table([video_id], times, feats), [video_id])
    commit_frame_parts(store, [part], stored_identity(store))


@pytest.fixture(scope="module")
def three_shards(world, tmp_path_factory):
    """The module's store with the graph rebuilt in three shards and an unwatched video."""
    tmp_path = tmp_path_factory.mktemp("three-shards")
    cfg, store, overrides = fresh_copy(world, tmp_path, "graph.n_shards=3")
    _add_unwatched_video(store, UNWATCHED)
    manifest = build_shards(cfg, store).manifest
    assert manifest.n_shards == 3 and UNWATCHED in manifest.video_ids
    assert all(s.users > 0 for s in manifest.shards)
    return cfg, store, overrides, manifest


def _model_variant(name: str, store: Store, n_total: int) -> FRAME:
    """The trained run, or an untrained model of another shape (random, non-zero biases)."""
    if name == "trained":
        saved = torch.load(store.path(run_path(RUN, "model.pt")), weights_only=True)
        model = FRAME(**saved["model_args"])
        model.load_state_dict(saved["state_dict"])
        return model.eval()
    torch.manual_seed(5)
    kwargs = {"no_negative": dict(use_negative=False),
              "free_clip_table": dict(use_visual=False, n_clips_total=n_total),
              "trainable_features": dict(trainable_clip_features=True,
                                         n_clips_total=n_total)}[name]
    model = FRAME(2048, dim=16, hidden=32, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["trained", "no_negative", "free_clip_table",
                                     "trainable_features"])
def test_sharded_embeddings_equal_single_process_and_forward(three_shards, ray_local,
                                                             variant) -> None:
    """One Ray task per shard plus the driver's sum = the whole graph in one process = the
    model's own forward on every (user, video) pair."""
    _, store, _, manifest = three_shards
    n_c, n_users, n_videos = 4, manifest.n_users, manifest.n_videos
    model = _model_variant(variant, store, n_videos * n_c)
    data, _ = whole_graph(store, n_c, model.use_negative)
    if variant == "trainable_features":  # the table starts from the extracted features
        model.init_clip_features(data.clip_features + 0.1)

    single = whole_graph_embeddings(model, store, n_c)
    sharded = sharded_embeddings(model, store, n_c)
    assert (single.tasks, sharded.tasks) == (0, 3)
    assert sharded.h_c.shape == (n_videos * n_c, 16) and sharded.h_u_pos.shape == (n_users, 16)
    for name in ("h_c", "h_u_pos", "h_u_neg"):
        got, expected = getattr(sharded, name), getattr(single, name)
        if not model.use_negative and name == "h_u_neg":
            assert got is None and expected is None
            continue
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    assert (sorted(zip(sharded.train_users.tolist(), sharded.train_videos.tolist()))
            == sorted(zip(single.train_users.tolist(), single.train_videos.tolist())))
    assert len(sharded.train_users) == manifest.n_train
    # tasks sent their C_k x d tables and user rows, never the clip features (C_k x 2048)
    clips_in_shards = sum(s.videos for s in manifest.shards) * n_c
    tables = 3 if model.use_negative else 2
    assert sharded.bytes_from_tasks < (clips_in_shards * tables + 2 * n_users) * 16 * 4 + 10**5

    users = torch.arange(n_users).repeat_interleave(n_videos)  # every (user, video) pair
    videos = torch.arange(n_videos).repeat(n_users)
    with torch.no_grad():
        forward = model.score_pairs(data.clip_features, data.graph, users, videos)
        from_tables = model.video_scores(users, videos, sharded.h_c, sharded.h_u_pos,
                                         sharded.h_u_neg, n_c)
        torch.testing.assert_close(from_tables, forward, atol=TOL, rtol=0)
        # nobody watched it: no neighbour, H_c = alpha_0 H_c^(0) (eq. 10)
        v = manifest.video_ids.index(UNWATCHED)
        clips = torch.arange(v * n_c, (v + 1) * n_c)
        h_c0 = model.clip_input(data.clip_features[clips], clips)
        torch.testing.assert_close(sharded.h_c[clips], model.layer_weights[0] * h_c0,
                                   atol=TOL, rtol=0)


@pytest.mark.slow
def test_job_over_three_shards_ranks_as_the_forward(three_shards, ray_local, capsys) -> None:
    """``python -m jobs.score ... score.kernel=eager score.actors=2`` on the 3-shard graph."""
    _, store, overrides, manifest = three_shards
    assert score_job.main([*overrides, "score.kernel=eager", "score.actors=2"]) == 0
    out = capsys.readouterr().out
    assert "embeddings 3 shard task(s); kernel eager, 2 actor(s)" in out
    model = _model_variant("trained", store, 0)
    data, _ = whole_graph(store, 4)
    n_users, n_videos = len(data.user_rows), len(data.video_ids)
    users = torch.arange(n_users).repeat_interleave(n_videos)
    videos = torch.arange(n_videos).repeat(n_users)
    with torch.no_grad():
        logits = model.score_pairs(data.clip_features, data.graph, users, videos)
    user_ids, video_ids = data.user_ids.to_pylist(), manifest.video_ids
    scores = {(user_ids[u], video_ids[v]): float(s)
              for u, v, s in zip(users.tolist(), videos.tolist(), logits.tolist())}
    seen = {(user_ids[u], video_ids[v]) for u, v in zip(data.train_users.tolist(),
                                                       data.train_videos.tolist())}
    expected = naive_top_k((scores, seen, sorted(user_ids), sorted(video_ids)), 3, True)
    assert (user_ids[0], UNWATCHED) in scores  # the unwatched video is a candidate
    assert_same_lists(top_k_lists(read_scores(store)), expected)
