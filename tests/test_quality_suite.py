"""The quality suite's parts: feature worlds, baselines, the learnable ceiling, gap closed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from frame_dist.config import WorldConfig
from frame_dist.evaluate.baselines import (
    BaselineData,
    Pairs,
    run_baselines,
    smoothed_rate,
)
from frame_dist.evaluate.ceiling import WorldModelFit, gap_closed, world_indices
from frame_dist.ingest.feature_world import (
    FeatureSpec,
    frame_features,
    frame_topics,
    write_feature_world,
)
from frame_dist.ingest.synthetic import simulate_world

SMALL = dict(preset="custom", n_users=120, n_videos=60, n_topics=4, interactions_per_user=20,
             min_scenes=4, max_scenes=4)


def test_frame_topics_follow_the_scene_timeline():
    world = simulate_world(WorldConfig(**SMALL))
    lay = world.layout
    topics = frame_topics(world, grid=8)
    for v in (0, 7, 31):
        for g in range(8):
            t = (g + 0.5) / 8 * lay.duration_s[v]
            lo, hi = lay.scene_ptr[v], lay.scene_ptr[v + 1]
            scene = next(s for s in range(lo, hi)
                         if lay.scene_start_s[s] <= t < lay.scene_end_s[s])
            assert topics[v, g] == lay.scene_topic[scene]


def test_frame_features_are_topic_vectors_plus_noise():
    world = simulate_world(WorldConfig(**SMALL))
    clean = frame_features(world, FeatureSpec(grid=8, dim=16, noise=0.0))
    topics = frame_topics(world, 8)
    assert clean.shape == (60, 8, 16) and clean.dtype == np.float32
    # noise-free frames of the same topic are the same vector, different topics differ
    same = topics == topics[0, 0]
    assert np.allclose(clean[same], clean[0, 0])
    assert not np.allclose(clean[~same][0], clean[0, 0])
    assert (clean >= 0).all()  # |N(0, 1)|, like a ReLU trunk's pooled output
    noisy = frame_features(world, FeatureSpec(grid=8, dim=16, noise=2.0))
    assert np.std(noisy - clean) == pytest.approx(2.0, rel=0.05)


def test_write_feature_world_is_deterministic_and_idempotent(tmp_path):
    cfg = WorldConfig(**SMALL)
    fw = write_feature_world(cfg, FeatureSpec(grid=8, dim=16), str(tmp_path / "w"))
    first = {p: open(p, "rb").read() for p in (fw.interactions_csv, fw.videos_csv,
                                                fw.features_npy, fw.feature_ids)}
    assert "uri" not in open(fw.videos_csv).readline()
    assert open(fw.interactions_csv).readline().strip().endswith('"p_full"')
    mtime = (tmp_path / "w" / "frames.npy").stat().st_mtime_ns
    again = write_feature_world(cfg, FeatureSpec(grid=8, dim=16), str(tmp_path / "w"))
    assert (tmp_path / "w" / "frames.npy").stat().st_mtime_ns == mtime  # nothing rewritten
    assert again.feature_ids == fw.feature_ids
    other = write_feature_world(cfg, FeatureSpec(grid=8, dim=16), str(tmp_path / "w2"))
    assert {p.replace("/w2/", "/w/"): open(p, "rb").read() for p in (
        other.interactions_csv, other.videos_csv, other.features_npy, other.feature_ids)
    } == first
    write_feature_world(cfg, FeatureSpec(grid=8, dim=16, noise=3.0), str(tmp_path / "w"))
    meta = json.loads((tmp_path / "w" / "feature_world.json").read_text())
    assert meta["features"]["noise"] == 3.0  # a changed spec rewrites the world
    assert open(fw.features_npy, "rb").read() != first[fw.features_npy]
    assert fw.import_overrides("x")[-1] == "extract.grid_size=8"


def test_smoothed_rate_by_hand():
    keys = np.array([0, 0, 0, 1])
    labels = np.array([1, 1, 0, 0])
    # prior 0.5; key 0: (2 + 2 * 0.5) / (3 + 2) = 0.6; key 1: (0 + 1) / (1 + 2); key 2: prior
    assert smoothed_rate(keys, labels, 3, 2.0) == pytest.approx([0.6, 1 / 3, 0.5])


def test_gap_closed():
    assert gap_closed(0.75, 0.70, 0.80) == pytest.approx(0.5)
    assert gap_closed(0.65, 0.70, 0.80) == pytest.approx(-0.5)
    assert np.isnan(gap_closed(0.75, 0.80, 0.80))


def _split(world, rng):
    """Random 70/10/20 split of the world's rows as Pairs in world indices."""
    n = world.n_interactions
    part = rng.choice(3, n, p=[0.7, 0.1, 0.2])
    full = world.outcome.full.astype(np.int64)
    return [Pairs(world.user_index[part == i], world.video_index[part == i], full[part == i])
            for i in range(3)], part


def test_ceiling_recovers_the_users_from_many_views():
    """With 150 views per user the MAP fit is close to the truth; with 8 it is not."""
    dense = simulate_world(WorldConfig(**{**SMALL, "interactions_per_user": 150,
                                          "n_videos": 200}))
    rng = np.random.default_rng(0)
    (train, _, test), part = _split(dense, rng)
    t = part == 0
    fit = WorldModelFit(dense).fit(dense.user_index[t], dense.video_index[t],
                                   dense.outcome.play_time_s[t], dense.outcome.full[t])
    p = fit.p_full(test.users, test.videos)
    truth = dense.outcome.p_full[part == 2]
    assert np.corrcoef(p, truth)[0, 1] > 0.95
    assert np.abs(p - truth).mean() < 0.05
    # the fitted dislikes separate the disliked topics (taste < 0) from the liked ones
    disliked = dense.users.taste < 0
    assert fit.dislike[disliked].mean() > 0 > fit.dislike[~disliked].mean()


def test_world_indices_names_an_unknown_id():
    world = simulate_world(WorldConfig(**SMALL))
    u, v = world_indices(world, ["u0003"], ["v00005"])
    assert (u.tolist(), v.tolist()) == ([3], [5])
    with pytest.raises(ValueError, match="'u9999' is not in the world"):
        world_indices(world, ["u9999"], ["v00005"])


def test_baselines_find_a_user_signal():
    """Users differ only by patience here: the user rate beats the constant, the video rate
    does not, and every baseline reports finite metrics on the same rows."""
    world = simulate_world(WorldConfig(**{**SMALL, "dislike_hazard": 0.0,
                                          "impatience_sigma": 1.0, "base_hazard": 0.2}))
    (train, valid, test), _ = _split(world, np.random.default_rng(1))
    features = np.random.default_rng(2).random((world.layout.n_videos, 8))
    data = BaselineData(train, valid, test, features, world.users.n_users,
                        world.layout.n_videos)
    result = run_baselines(data, seed=0)
    assert set(result) == {"constant", "user rate", "video rate", "FM", "LightGCN"}
    assert result["constant"]["auc"] == 0.5
    assert result["user rate"]["auc"] > 0.7
    assert result["user rate"]["auc"] > result["video rate"]["auc"] + 0.1
    for metrics in result.values():
        assert np.isfinite([metrics["auc"], metrics["logloss"], metrics["ndcg@5"]]).all()
