"""The planner (frame_dist.train.plan, jobs.plan) on a hand-built store: statistics, edges, every
byte
term, the shard rule, refusals with their numbers, and jobs.train refusing before Ray starts.

The estimate against measured peak memory of real Ray Train runs is in tests/test_train_loop.py
(``test_plan_estimate_matches_measured_peak_rss``) and benchmarks/plan_accuracy.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from feature_store.frames import commit_frame_parts, frame_features_table, write_frame_part
from feature_store.schemas import INTERACTIONS, VIDEOS
from feature_store.store import Store
from frame_dist.config import load_config
from frame_dist.graph.shards import build_shards, read_graph_manifest
from frame_dist.train.plan import (
    GIB,
    WORKER_BASELINE_BYTES,
    Budget,
    DataStats,
    PlanError,
    check_plan,
    expected_distinct,
    expected_edges,
    n_parameters,
    plan_training,
    read_data_stats,
)

GRID = 4
# (user, video, watch ratio, split): 5 train rows (2 full watches; skips at r = 0.1, 0.3, 0.55,
# i.e. grid bins 0, 1, 2), 1 valid, 2 test, plus a full watch of v2, which has no frame features
# and so is left out of the graph and of the statistics
ROWS = [("u0", "v0", 1.0, "train"), ("u0", "v1", 0.3, "train"), ("u1", "v0", 0.55, "train"),
        ("u1", "v1", 1.0, "train"), ("u2", "v0", 0.1, "train"), ("u2", "v1", 0.8, "valid"),
        ("u0", "v0", 0.9, "test"), ("u1", "v0", 0.25, "test"), ("u2", "v2", 1.0, "train")]
# the paper's positive graph (eq. 2): the hand counts below are of its edges
BASE = [f"extract.grid_size={GRID}", "graph.n_clips=4", "graph.n_shards=1", "model.dim=4",
        "model.hidden=8", "train.batch_size=2", "train.workers=1", "graph.positives=full_watch"]


@pytest.fixture(scope="module")
def hand_store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("plan") / "store")
    store = Store(root)
    store.table("videos").write(pa.table({"video_id": ["v0", "v1", "v2"], "uri": ["a", "b", "c"],
                                          "duration_s": [10.0] * 3}, schema=VIDEOS))
    user, video, ratio, split = (list(c) for c in zip(*ROWS))
    n = len(ROWS)
    store.table("interactions").write(pa.table({
        "user_id": user, "video_id": video, "play_time_s": np.array(ratio) * 10,
        "duration_s": [10.0] * n, "watch_ratio": ratio, "full_watch": np.array(ratio) >= 0.98,
        "timestamp": np.arange(n), "split": split, "source_row": np.arange(1, n + 1)},
        schema=INTERACTIONS))
    ids = ["v0", "v1"]
    feats = np.random.default_rng(0).normal(size=(2, GRID, 2048)).astype(np.float32)
    part = write_frame_part(store, frame_features_table(ids, np.zeros((2, GRID)), feats), ids)
    commit_frame_parts(store, [part], {"weights": "test", "grid_size": GRID, "dim": 2048,
                                       "image_size": 0})
    return store, [f"store.root={root}", *BASE]


def test_data_stats_from_the_store(hand_store):
    store, overrides = hand_store
    stats = read_data_stats(store, load_config(None, overrides))
    assert (stats.n_users, stats.n_videos) == (3, 2)  # v2 has no features: u2's view dropped
    assert (stats.n_train, stats.n_valid, stats.n_test, stats.n_full_train) == (5, 1, 2, 2)
    assert stats.skip_hist.tolist() == [1, 1, 1, 0]  # r = 0.1, 0.3, 0.55 at R = G = 4
    assert stats.video_train.tolist() == [3, 2]
    assert stats.video_rows.tolist() == [5, 3]
    assert (stats.n_features, stats.feature_part_rows) == (2048, 2 * GRID)


def test_data_stats_before_extraction(hand_store, tmp_path):
    """Planning before the extract stage: every video of the videos table, F = 2048."""
    import shutil

    store, overrides = hand_store
    shutil.copytree(store.path(), tmp_path / "s")
    shutil.rmtree(tmp_path / "s" / "tables" / "frame_features")
    stats = read_data_stats(Store(str(tmp_path / "s")), load_config(None, overrides))
    assert (stats.n_users, stats.n_videos, stats.n_train, stats.n_full_train) == (3, 3, 6, 3)
    assert stats.video_train.tolist() == [3, 2, 1]
    assert stats.feature_part_rows == 32 * GRID  # extract.videos_per_commit x G


@pytest.mark.parametrize("n_clips, positives, edges", [
    (4, "full_watch", (2 * 4, 3)),  # N_c per full watch; one skip clip per other row
    (4, "watched_clips", (2 * 4 + 0 + 1 + 2, 3)),  # + floor(r N_c) = 0, 1, 2 played clips
    (2, "full_watch", (2 * 2, 3)),
    (2, "watched_clips", (2 * 2 + 0 + 0 + 1, 3)),  # floor(0.1 * 2), floor(0.3 * 2), ...
    (1, "watched_clips", (2, 3)),
])
def test_expected_edges_equal_the_built_graph(hand_store, tmp_path, n_clips, positives, edges):
    store, overrides = hand_store
    cfg = load_config(None, [*overrides, f"graph.n_clips={n_clips}",
                             f"graph.positives={positives}"])
    stats = read_data_stats(store, cfg)
    assert expected_edges(stats, n_clips, positives) == edges
    import shutil  # build the real graph on a copy (each parameter builds its own)

    shutil.copytree(store.path(), tmp_path / "s")
    manifest = build_shards(cfg, Store(str(tmp_path / "s"))).manifest
    assert (manifest.nnz_pos, manifest.nnz_neg) == edges  # no repeated (user, video)


def test_expected_distinct_is_hypergeometric():
    # 2 of 5 rows; video 0 owns 3 rows, video 1 owns 2: P(absent) = C(2,2)/C(5,2), C(3,2)/C(5,2)
    assert expected_distinct(np.array([3, 2]), 5, 2) == pytest.approx((1 - 1 / 10) + (1 - 3 / 10))
    assert expected_distinct(np.array([3, 2, 0]), 5, 5) == pytest.approx(2.0)
    assert expected_distinct(np.array([3, 2]), 5, 0) == 0.0


@pytest.mark.parametrize("model", [[], ["model.use_negative=false"], ["model.enhance=false"],
                                   ["model.use_visual=false"]])
def test_parameter_count_equals_the_model(model):
    from frame_dist.train.trainer import build_model

    cfg = load_config(None, [*BASE, *model])
    frame = build_model(cfg.model, 2048, n_clips_total=8)
    assert n_parameters(cfg, 2048, 8) == sum(p.numel() for p in frame.parameters())
    if not model:  # d = 4, hidden = 8, F = 2048: MLP 8 x 8 + 8 + 8 + 1 = 81 each
        assert n_parameters(cfg, 2048, 8) == (2 * 16 + 81 + 2) + (2 * 16 + 81) + 16 + 2048 * 4 + 4


def test_plan_terms_by_hand(hand_store):
    """W = 1 on the committed graph (N_c = 4): 3 users, 2 videos = 8 clips, 8 + 3 edges, 5 train /
    1 valid / 2 test rows, d = 4, hidden = 8, B = 2; every term computed by hand."""
    store, overrides = hand_store
    cfg = load_config(None, overrides)
    stats = read_data_stats(store, cfg)
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the committed graph of this config
        shutil.copytree(store.path(), f"{tmp}/s")
        manifest = build_shards(cfg, Store(f"{tmp}/s")).manifest
    plan = plan_training(stats, cfg, Budget(GIB), "cpu", manifest)
    assert plan.exact_shards and plan.edges == (8, 3)
    p = 8440  # n_parameters: see test_parameter_count_equals_the_model
    union = 4 * 1.6  # |U| = N_c x E[distinct videos in 2 of 5 rows] (video counts 3, 2)
    local = 4 * ((1 - 0.6 ** 3) + (1 - 0.6 ** 2))  # each own row in the batch with p = 2 / 5
    expected = {
        "runtime baseline": WORKER_BASELINE_BYTES,
        "interaction rows": 82 * 8 + 40 * 5 + 8 * 3 + 8 * 5,
        "graph shard: Parquet read + merge": 60 * 11,
        "graph shard: stored CSR": 8 * 11 + 8 * (3 + 1),
        "graph shard: torch CSR R~, R~^T": 20 * 11 + 2 * 8 * (3 + 8 + 2),
        "clip features": 8 * 2048 * 4,
        "clip feature read buffers": (4 + 4) * (2 * GRID) * 2048 * 2,
        "parameters": 4 * p, "gradients": 4 * p, "Adam states": 8 * p,
        "best weights copy": 4 * p,
        # 3 users < 8 clips: R~ X precomputed, the FC on 2 x 3 users' sums + the batch's clips
        "precomputed R~X, R~1": 2 * 3 * (2048 + 1) * 4,
        "step: input FC side": local * 2048 * 4 + 5 * (2 * 3 + local) * 4 * 4,
        "step: user side": 8 * 2 * 3 * 4 * 4,
        "step: batch clips": 34 * union * 4 * 4,
        "step: pair MLPs": 2 * 4 * (5 * 2 * 8 + 5 * 4) * 4,
        "step: sparse workspace": 96 * 11 * local / 8,
        # 2 test pairs x (N_c (d + 2 hidden) + 2 d) x 4 B + (2 x 2 M_w + 7 x E[clips]) d 4 B
        # 2 test pairs (one chunk: fewer than evaluate.batch_size) + 16 B each + the chunk's
        # clips' features E[clips] x F x 4 B + the embeddings (R~ X precomputed: H_c^(0) of
        # the chunk's clips only, not of all C_w); E[clips] = N_c x E[distinct videos of 2
        # rows] = 4 x 1.6, as |U| above
        "evaluation": 2 * (4 * (4 + 2 * 8) + 2 * 4) * 4 + 2 * 16 + union * 2048 * 4
        + (12 + 7 * union) * 4 * 4,
    }
    got = {t.name: t.nbytes for t in plan.terms}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
    assert plan.total("host") == pytest.approx(sum(expected.values()))
    assert plan.comm_bytes_per_step == 0  # one worker sends nothing
    assert plan.fits and plan.recommended_shards == 1


def test_communication_bytes_by_hand(hand_store):
    """W = 2, expected shares (no committed graph): batches of 2, 2, 1 rows; per graph, and once
    more for the owners' H_c^(0) rows (frozen features partitioned by owner), the ids of the
    longest worker ((L + 1) x 8 B) and the (|U|, d) all-reduce forward + backward."""
    store, overrides = hand_store
    cfg = load_config(None, [*overrides, "train.workers=2", "graph.n_shards=2"])
    plan = plan_training(read_data_stats(store, cfg), cfg, Budget(GIB), "cpu")
    # batch of 2: |U| = 4 x 1.6; a worker owns half of each video's rows (1.5 and 1)
    longest = 4 * ((1 - 0.6 ** 1.5) + (1 - 0.6 ** 1))
    two = 3 * ((longest + 1) * 8 + 2 * (4 * 1.6) * 4 * 4)
    # batch of 1: exactly one video, |U| = 4
    longest = 4 * ((1 - 0.8 ** 1.5) + (1 - 0.8 ** 1))
    one = 3 * ((longest + 1) * 8 + 2 * 4 * 4 * 4)
    assert plan.comm_bytes_per_step == pytest.approx((2 * two + one) / 3)
    assert plan.worker.shards == 1 and plan.worker.users == pytest.approx(1.5)
    gpu = plan_training(read_data_stats(store, cfg), cfg, Budget(GIB), "cuda")
    assert gpu.dtype == "bf16" and plan.dtype == "fp32"  # train.precision=auto
    assert gpu.comm_bytes_per_step == plan.comm_bytes_per_step  # the sums stay fp32


def _big_stats(n_users=2_000_000, n_videos=200_000, per_user=50, grid=64) -> DataStats:
    """Statistics of a large data set (never materialised): uniform skips, 40% full watches."""
    n = n_users * per_user
    n_train = int(n * 0.7)
    full = int(n_train * 0.4)
    hist = np.full(grid, (n_train - full) // grid)
    popularity = np.full(n_videos, n_train // n_videos)
    return DataStats(n_users, n_videos, n_train, int(n * 0.1), n - n_train - int(n * 0.1), full,
                     hist, popularity, popularity * n // n_train, 2048, 32 * grid)


def test_shard_count_grows_with_the_graph():
    cfg = load_config(None, ["extract.grid_size=64", "graph.n_clips=16", "train.workers=4",
                             "graph.n_shards=4", "plan.shard_fraction=0.25"])
    plan = plan_training(_big_stats(), cfg, Budget(16 * GIB), "cpu")
    per_edge = 12 + 48 + 8 + 20
    edges = sum(plan.edges)
    # the smallest multiple of W = 4 with one shard's graph <= 25% of 16 GiB
    k = plan.recommended_shards
    assert k % 4 == 0 and k > 4
    assert per_edge * edges / k <= 0.25 * 16 * GIB < per_edge * edges / (k - 4)
    assert plan.shard_graph_bytes == pytest.approx(per_edge * edges / 4)


def test_refused_with_numbers_and_alternatives():
    cfg = load_config(None, ["extract.grid_size=64", "graph.n_clips=64", "train.workers=2",
                             "graph.n_shards=2"])
    stats = _big_stats()

    def budget_for(c, device):
        return Budget(16 * GIB, None, "plan.worker_memory_gb=16")

    plan = plan_training(stats, cfg, budget_for(cfg, "cpu"), "cpu")
    assert not plan.fits
    from frame_dist.train.plan import alternatives

    with pytest.raises(PlanError) as err:
        check_plan(plan, alternatives(stats, cfg, budget_for, "cpu"))
    message = str(err.value)
    total = plan.total("host") / GIB
    assert f"estimated {total:.2f} GiB of host memory per worker (rank 0 of 2)" in message
    assert "exceeds the budget of 16.00 GiB" in message
    top = plan.largest("host")[0]
    assert f"largest terms: {top.name} {top.nbytes / GIB:.2f} GiB" in message
    assert "train.workers=4 graph.n_shards=4:" in message
    assert "graph.n_clips=32:" in message
    assert "train.use_gpu=true" in message
    assert "plan.worker_memory_gb" in message


def _commit_graph(hand_store, tmp_path, extra=()):
    import shutil

    store, overrides = hand_store
    root = tmp_path / "s"
    shutil.copytree(store.path(), root)
    overrides = [*overrides, f"store.root={root}", *extra]
    build_shards(load_config(None, overrides), Store(str(root)))
    return overrides


def test_train_job_refuses_before_ray_starts(hand_store, tmp_path, monkeypatch, capsys):
    from jobs import train as train_job

    overrides = _commit_graph(hand_store, tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started: list[str] = []
    monkeypatch.setattr(train_job, "init_ray", lambda *a, **k: started.append("ray"))
    monkeypatch.setattr(train_job, "run_training", lambda *a, **k: started.append("train"))
    assert train_job.main([*overrides, "plan.worker_memory_gb=0.5"]) == 1
    err = capsys.readouterr().err
    assert "stage train failed: PlanError: plan: N_c=4, W=1, 1 shard(s), cpu fp32:" in err
    assert "exceeds the budget of 0.50 GiB; largest terms: runtime baseline 0.89 GiB" in err
    assert "(budget: plan.worker_memory_gb=0.5)" in err
    assert "to change: train.workers=2 graph.n_shards=2:" in err
    assert started == []  # neither Ray nor Ray Train was started

    # with room, the plan passes and training starts (stubbed here)
    monkeypatch.setattr(train_job, "run_training", lambda *a, **k: started.append("train") or {
        "test": {"auc": 0.5}, "best_epoch": 1, "epochs_run": 1})
    assert train_job.main([*overrides, "plan.worker_memory_gb=4"]) == 0
    assert started == ["ray", "train"]
    assert "plan: N_c=4, W=1, 1 shard(s): per worker 0.89 GiB host of 4.00" in \
        capsys.readouterr().out


def test_plan_job(hand_store, tmp_path, capsys):
    from jobs import plan as plan_job

    overrides = _commit_graph(hand_store, tmp_path)
    assert plan_job.main([*overrides, "plan.worker_memory_gb=4", "train.use_gpu=false"]) == 0
    out = capsys.readouterr().out
    assert "plan: N_c=4, W=1 worker(s), 1 shard(s) (committed graph), cpu fp32, ZeRO 0" in out
    assert "| graph shard: stored CSR | host |" in out
    assert "total host: 0.89 GiB per worker of 4.00 GiB: fits" in out
    assert "per worker for every N_c of the grid: N_c=1: " in out
    # W = 2 on a graph of 1 shard (training would refuse it): expected sizes for 2 shards
    assert plan_job.main([*overrides, "train.workers=2", "graph.n_shards=2",
                          "plan.worker_memory_gb=4", "train.use_gpu=false"]) == 0
    assert "W=2 worker(s), 2 shard(s) (expected sizes)" in capsys.readouterr().out
    assert plan_job.main([*overrides, "plan.worker_memory_gb=0.1"]) == 1
    assert "exceeds the budget of 0.10 GiB" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a bad config: exit 2 before anything runs
        plan_job.main([*overrides, "plan.shard_fraction=0"])
    assert exit_.value.code == 2
    assert "plan.shard_fraction=0.0 must be in (0, 1]" in capsys.readouterr().err
    assert read_graph_manifest(Store(str(tmp_path / "s")), 4).n_shards == 1


def test_plan_before_ingest_says_what_to_run(tmp_path):
    cfg = load_config(None, [f"store.root={tmp_path}/store"])
    with pytest.raises(PlanError, match="no committed videos / interactions table .* run "
                                        "jobs.ingest"):
        read_data_stats(Store.from_config(cfg.store), cfg)
