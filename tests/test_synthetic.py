"""Tests of frame_dist/ingest/synthetic.py: real mp4 files, the hazard simulation and the world
files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import av
import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from feature_store.schemas import SCENES, TRUTH
from frame_dist.config import ConfigError, IngestConfig, WorldConfig, load_config
from frame_dist.ingest.synthetic import (
    SKIP_HORIZON,
    Users,
    VideoLayout,
    full_watch_probability,
    generate_world,
    main,
    render_video,
    simulate_watches,
    simulate_world,
    topic_palette,
    topic_pattern,
    world_stats,
)


def tiny_cfg(out_dir: Path | str, **changes) -> WorldConfig:
    """8 users, 6 short tiny videos: generates in well under a second."""
    cfg = WorldConfig(preset="custom", seed=7, out_dir=str(out_dir), n_users=8, n_videos=6,
                      n_topics=4, interactions_per_user=4, min_duration_s=1.5,
                      max_duration_s=3.0, fps_choices=(10, 12), sizes=((48, 32), (64, 48)),
                      min_scenes=2, max_scenes=3)
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("world"))
    return cfg, generate_world(cfg)


def decode(uri: str) -> tuple[np.ndarray, dict]:
    """All frames (F, H, W, 3) plus what the container and stream report."""
    with av.open(uri) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
        info = {
            "stream_frames": stream.frames,
            "stream_duration": float(stream.duration * stream.time_base),
            "container_duration": container.duration / 1e6,
            "fps": stream.average_rate,
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "times": np.array([f.time for f in frames]),
        }
        pixels = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    return pixels, info


def read_csv(path: str) -> dict[str, np.ndarray]:
    table = pa_csv.read_csv(path)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


# --------------------------------------------------------------------------- mp4 files


def test_mp4_decode_to_declared_frames_and_duration(tiny_world):
    cfg, info = tiny_world
    layout = simulate_world(cfg).layout
    videos = read_csv(info.videos_csv)
    assert list(videos["video_id"]) == [f"v{i:05d}" for i in range(6)]
    for v, (vid, uri, duration) in enumerate(zip(videos["video_id"], videos["uri"],
                                                 videos["duration_s"])):
        assert uri == os.path.join(info.out_dir, "videos", f"{vid}.mp4")
        assert os.path.isabs(uri)
        pixels, meta = decode(uri)
        fps = int(layout.fps[v])
        assert fps in cfg.fps_choices and meta["fps"] == fps
        n = int(layout.n_frames[v])
        assert n == round(duration * fps)
        assert duration == n / fps  # the declared duration is exactly n_frames / fps
        assert cfg.min_duration_s - 0.5 / fps <= duration <= cfg.max_duration_s + 0.5 / fps
        assert len(pixels) == n and meta["stream_frames"] == n
        assert abs(meta["container_duration"] - duration) <= 1 / fps
        assert abs(meta["stream_duration"] - duration) <= 1 / fps
        np.testing.assert_allclose(meta["times"], np.arange(n) / fps, atol=1e-3)
        assert (pixels.shape[2], pixels.shape[1]) in cfg.sizes
        assert meta["codec"] == "h264" and meta["pix_fmt"] == "yuv420p"


def _palette_features(pixels: np.ndarray) -> np.ndarray:
    """Per frame: 5th and 95th percentile of each channel ~ (background, foreground) colour,
    a statistic that does not move with the pattern's phase. (F, 6)."""
    flat = pixels.reshape(len(pixels), -1, 3).astype(np.float64)
    return np.concatenate([np.percentile(flat, 5, axis=1), np.percentile(flat, 95, axis=1)], 1)


def test_scenes_differ_and_frames_within_a_scene_are_close(tiny_world):
    cfg, info = tiny_world
    scenes = pq.read_table(info.scenes_parquet)
    assert scenes.schema.equals(SCENES)
    rows = scenes.to_pylist()
    videos = read_csv(info.videos_csv)
    n_pairs = 0
    for vid, uri, duration in zip(videos["video_id"], videos["uri"], videos["duration_s"]):
        own = [r for r in rows if r["video_id"] == vid]
        assert [r["scene_index"] for r in own] == list(range(len(own)))
        assert cfg.min_scenes <= len(own) <= cfg.max_scenes
        assert own[0]["start_s"] == 0 and own[-1]["end_s"] == duration
        assert all(a["end_s"] == b["start_s"] for a, b in zip(own, own[1:]))
        assert all(a["topic"] != b["topic"] for a, b in zip(own, own[1:]))
        pixels, meta = decode(uri)
        feats = _palette_features(pixels)
        centres = []
        for r in own:
            inside = (meta["times"] >= r["start_s"]) & (meta["times"] < r["end_s"])
            assert inside.any(), f"scene {r} of {vid} has no frame"
            centre = feats[inside].mean(axis=0)
            assert np.abs(feats[inside] - centre).max() < 20, (vid, r)  # only noise and motion
            centres.append(centre)
        for a, b in zip(centres, centres[1:]):
            assert np.linalg.norm(a - b) > 50, vid  # a different topic: different colours
            n_pairs += 1
    assert n_pairs >= 6


def test_topics_differ_in_colour_and_in_pattern():
    fg, bg = topic_palette(8)
    fg_gap = np.linalg.norm(fg[:, None] - fg[None], axis=-1) + 1e9 * np.eye(8)
    assert fg_gap.min() > 60
    x = (np.arange(96) / 64.0)[None, None, :]
    y = (np.arange(64) / 64.0)[None, :, None]
    levels = np.stack([topic_pattern(k, x, y, np.zeros((1, 1, 1)))[0] for k in range(8)])
    assert levels.shape == (8, 64, 96)
    assert levels.min() >= 0 and levels.max() <= 1
    assert (levels.std(axis=(1, 2)) > 0.3).all()  # every topic has a visible pattern
    corr = np.corrcoef(levels.reshape(8, -1)) - np.eye(8)
    assert np.abs(corr).max() < 0.6
    moved = topic_pattern(0, x, y, np.full((1, 1, 1), 0.25))[0]
    assert np.abs(moved - levels[0]).mean() > 0.2  # the pattern moves with its phase


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_world_different_seed_different_world(tmp_path):
    a = generate_world(tiny_cfg(tmp_path / "a"))
    b = generate_world(tiny_cfg(tmp_path / "b"))
    c = generate_world(tiny_cfg(tmp_path / "c", seed=8))
    assert Path(a.interactions_csv).read_bytes() == Path(b.interactions_csv).read_bytes()
    assert pq.read_table(a.truth_parquet).equals(pq.read_table(b.truth_parquet))
    assert pq.read_table(a.scenes_parquet).equals(pq.read_table(b.scenes_parquet))
    for vid in read_csv(a.videos_csv)["video_id"]:
        pa_, _ = decode(os.path.join(a.videos_dir, f"{vid}.mp4"))
        pb, _ = decode(os.path.join(b.videos_dir, f"{vid}.mp4"))
        np.testing.assert_array_equal(pa_, pb)
        assert (Path(a.videos_dir, f"{vid}.mp4").read_bytes()
                == Path(b.videos_dir, f"{vid}.mp4").read_bytes())
    assert Path(a.interactions_csv).read_bytes() != Path(c.interactions_csv).read_bytes()
    assert not pq.read_table(a.truth_parquet).equals(pq.read_table(c.truth_parquet))
    pa_, _ = decode(os.path.join(a.videos_dir, "v00000.mp4"))
    pc, _ = decode(os.path.join(c.videos_dir, "v00000.mp4"))
    assert pa_.shape != pc.shape or np.abs(pa_.astype(int) - pc).mean() > 5


def test_render_is_a_pure_function_of_seed_and_video():
    cfg = tiny_cfg("unused")
    layout = simulate_world(cfg).layout
    np.testing.assert_array_equal(render_video(layout, 2, 4, seed=7),
                                  render_video(layout, 2, 4, seed=7))
    assert not np.array_equal(render_video(layout, 2, 4, seed=7),
                              render_video(layout, 2, 4, seed=9))


# --------------------------------------------------------------------------- the hazard process


def _two_scene_world() -> tuple[VideoLayout, Users]:
    """One 5 s video: scene 0 = [0, 2) topic 0, scene 1 = [2, 5) topic 1; one user."""
    layout = VideoLayout(
        video_ids=np.array(["v00000"], dtype=object), fps=np.array([10]),
        n_frames=np.array([50]), duration_s=np.array([5.0]), width=np.array([64]),
        height=np.array([48]), popularity=np.array([1.0]), scene_ptr=np.array([0, 2]),
        scene_start_s=np.array([0.0, 2.0]), scene_end_s=np.array([2.0, 5.0]),
        scene_topic=np.array([0, 1]))
    # sigmoid(-0) = 1/2, sigmoid(-ln 3) = 1/4
    users = Users(user_ids=np.array(["u0000"], dtype=object),
                  taste=np.array([[0.0, math.log(3.0)]]), impatience=np.array([2.0]))
    return layout, users


def test_p_full_hand_computed():
    layout, users = _two_scene_world()
    # h0 = 0.05 * 2 + 1.0 / 2 = 0.6 on [0, 2); h1 = 0.1 + 1.0 / 4 = 0.35 on [2, 0.98 * 5 = 4.9)
    p = full_watch_probability(layout, users, np.array([0]), np.array([0]),
                               base_hazard=0.05, dislike_hazard=1.0)
    assert p[0] == pytest.approx(math.exp(-(0.6 * 2 + 0.35 * 2.9)), rel=1e-12)
    assert p[0] == pytest.approx(0.109154, abs=1e-6)  # exp(-2.215)
    none = full_watch_probability(layout, users, np.array([0]), np.array([0]),
                                  base_hazard=0.0, dislike_hazard=0.0)
    assert none[0] == 1.0


def test_skip_times_follow_the_hazard():
    layout, users = _two_scene_world()
    r = 200_000
    out = simulate_watches(layout, users, np.zeros(r, np.int64), np.zeros(r, np.int64),
                           np.random.default_rng(3), base_hazard=0.05, dislike_hazard=1.0)
    t = out.play_time_s
    skipped = ~out.full
    sd = math.sqrt(0.25 / r)
    # P(skip before 2 s) = 1 - e^-1.2; P(skip in [2, 4.9)) = e^-1.2 - e^-2.215; H(3) = 1.55
    assert (skipped & (t < 2)).mean() == pytest.approx(1 - math.exp(-1.2), abs=5 * sd)
    assert (skipped & (t >= 2)).mean() == pytest.approx(
        math.exp(-1.2) - math.exp(-2.215), abs=5 * sd)
    assert (skipped & (t < 3)).mean() == pytest.approx(1 - math.exp(-1.55), abs=5 * sd)
    assert out.full.mean() == pytest.approx(math.exp(-2.215), abs=5 * sd)
    assert t[skipped].max() < 4.9 and t[skipped].min() > 0
    assert (out.skip_scene[skipped & (t < 2)] == 0).all()
    assert (out.skip_scene[skipped & (t >= 2)] == 1).all()
    assert (out.skip_scene[out.full] == -1).all()
    assert not out.skip_disliked.any()  # both tastes >= 0
    # full watches play the whole video, a quarter of them replay up to 30% more
    full_t = t[out.full]
    assert full_t.min() == 5.0 and full_t.max() <= 5.0 * 1.3
    assert (full_t > 5.0).mean() == pytest.approx(0.25, abs=0.02)


def test_p_full_matches_the_empirical_full_watch_rate():
    cfg = WorldConfig(preset="custom", seed=11, n_users=40, n_videos=30,
                      interactions_per_user=10)
    world = simulate_world(cfg)
    pick = np.arange(0, world.n_interactions, max(1, world.n_interactions // 200))[:200]
    reps = 2000
    u = np.repeat(world.user_index[pick], reps)
    v = np.repeat(world.video_index[pick], reps)
    out = simulate_watches(world.layout, world.users, u, v, np.random.default_rng(5),
                           base_hazard=cfg.base_hazard, dislike_hazard=cfg.dislike_hazard)
    p_hat = out.full.reshape(len(pick), reps).mean(axis=1)
    p = world.outcome.p_full[pick]
    np.testing.assert_array_equal(out.p_full.reshape(len(pick), reps)[:, 0], p)
    assert p.min() < 0.1 and p.max() > 0.6  # a spread of probabilities is tested
    sd = np.sqrt(p * (1 - p) / reps)
    assert np.all(np.abs(p_hat - p) <= 4.5 * sd + 1e-3)
    assert np.abs(p_hat - p).mean() < 0.01


def test_skip_horizon_matches_ingest_full_watch_rule():
    assert SKIP_HORIZON == pytest.approx(1 - IngestConfig().full_watch_tolerance)
    world = simulate_world(WorldConfig(preset="custom", seed=2, n_users=50, n_videos=30))
    ratio = world.outcome.play_time_s / world.layout.duration_s[world.video_index]
    np.testing.assert_array_equal(ratio >= 1 - IngestConfig().full_watch_tolerance,
                                  world.outcome.full)
    assert ratio[world.outcome.full].min() >= 1.0
    assert ratio.max() <= 1.3


# --------------------------------------------------------------------------- shape


@pytest.mark.parametrize("preset", ["small", "medium"])
def test_world_shape_at_the_presets(preset):
    cfg = load_config(None, [f"world.preset={preset}"]).world
    world = simulate_world(cfg)
    stats = world_stats(world)
    assert stats["users"] == cfg.n_users and stats["videos"] == cfg.n_videos
    assert 0.25 <= stats["full_watch_rate"] <= 0.45
    assert stats["skips"] > stats["full_watches"]
    assert min(stats["skip_quarters"]) > 0.05 * stats["skips"]
    assert stats["skips_in_disliked_scene"] > stats["disliked_time_share"] + 0.3
    assert abs(stats["mean_p_full"] - stats["full_watch_rate"]) < 0.03
    per_user = np.bincount(world.user_index, minlength=cfg.n_users)
    assert per_user.min() >= 3 and per_user.max() <= cfg.n_videos
    assert abs(per_user.mean() - cfg.interactions_per_user) < 0.1 * cfg.interactions_per_user
    pairs = world.user_index * cfg.n_videos + world.video_index
    assert len(np.unique(pairs)) == len(pairs)  # distinct videos per user
    shown = np.bincount(world.video_index, minlength=cfg.n_videos)
    assert np.corrcoef(world.layout.popularity, shown)[0, 1] > 0.5  # popularity skew
    same_user = world.user_index[1:] == world.user_index[:-1]
    gap = np.diff(world.timestamp)[same_user]
    assert (gap >= np.ceil(world.outcome.play_time_s[:-1][same_user]) + 1).all()


def test_world_files_agree(tiny_world):
    cfg, info = tiny_world
    inter = read_csv(info.interactions_csv)
    assert list(inter) == ["user_id", "video_id", "play_time_s", "duration_s", "timestamp"]
    truth = pq.read_table(info.truth_parquet)
    assert truth.schema.equals(TRUTH)
    assert truth.num_rows == len(inter["user_id"]) == info.n_interactions
    t = truth.to_pydict()
    assert list(t["user_id"]) == list(inter["user_id"])
    assert list(t["video_id"]) == list(inter["video_id"])
    assert list(t["timestamp"]) == list(inter["timestamp"])
    keys = set(zip(inter["user_id"], inter["video_id"], inter["timestamp"]))
    assert len(keys) == truth.num_rows
    assert set(inter["user_id"]) == {f"u{i:04d}" for i in range(8)}
    assert np.all(np.diff(inter["timestamp"]) >= 0)  # a log in time order
    for user in set(inter["user_id"]):
        ts = inter["timestamp"][inter["user_id"] == user]
        assert np.all(np.diff(ts) > 0)
    videos = read_csv(info.videos_csv)
    duration = dict(zip(videos["video_id"], videos["duration_s"]))
    np.testing.assert_array_equal(inter["duration_s"], [duration[v] for v in inter["video_id"]])
    ratio = inter["play_time_s"] / inter["duration_s"]
    p = np.asarray(t["p_full"])
    assert ((p > 0) & (p <= 1)).all()
    assert (ratio > 0).all() and (ratio < 0.98).any() and (ratio >= 1).any()
    meta = json.loads(Path(info.meta_json).read_text())
    assert meta["counts"]["interactions"] == info.n_interactions
    assert meta["counts"]["full_watches"] == int((ratio >= 0.98).sum())
    assert sum(meta["counts"]["skip_quarters"]) == int((ratio < 0.98).sum())
    assert meta["config"]["n_users"] == 8 and meta["config"]["sizes"] == [[48, 32], [64, 48]]


# --------------------------------------------------------------------------- idempotence


def _mtimes(root: str) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
    return out


def test_second_call_keeps_files_and_changed_config_regenerates(tmp_path):
    cfg = tiny_cfg(tmp_path / "w")
    first = generate_world(cfg)
    assert first.regenerated
    before = _mtimes(first.out_dir)
    assert len(before) == 5 + 6  # 5 tables + 6 mp4
    again = generate_world(tiny_cfg(tmp_path / "w"))
    assert not again.regenerated
    assert _mtimes(first.out_dir) == before
    assert dataclasses.replace(again, regenerated=True) == first

    old_csv = Path(first.interactions_csv).read_bytes()
    changed = generate_world(tiny_cfg(tmp_path / "w", n_videos=4, seed=8))
    assert changed.regenerated and changed.n_videos == 4
    assert sorted(os.listdir(changed.videos_dir)) == [f"v{i:05d}.mp4" for i in range(4)]
    assert Path(changed.interactions_csv).read_bytes() != old_csv
    assert json.loads(Path(changed.meta_json).read_text())["config"]["seed"] == 8

    forced = generate_world(tiny_cfg(tmp_path / "w", n_videos=4, seed=8), force=True)
    assert forced.regenerated

    os.remove(forced.meta_json)  # what a run killed before its end leaves behind
    resumed = generate_world(tiny_cfg(tmp_path / "w", n_videos=4, seed=8))
    assert resumed.regenerated and os.path.exists(resumed.meta_json)


# --------------------------------------------------------------------------- errors and CLI


@pytest.mark.parametrize("changes, message", [
    (dict(n_videos=0), "world.n_videos=0 must be > 0"),
    (dict(sizes=((48, 33),)), "world.sizes entry [48, 33] must be (width, height), even"),
    (dict(max_scenes=1), "world.max_scenes=1 must be >= world.min_scenes=2"),
    (dict(out_dir="s3://bucket/world"), "world.out_dir='s3://bucket/world' must be a local"),
])
def test_bad_config_is_refused_naming_the_field(tmp_path, changes, message):
    cfg = dataclasses.replace(tiny_cfg(tmp_path / "w"), **changes)
    with pytest.raises(ConfigError) as err:
        generate_world(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "w").exists()


def test_cli_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["world.preset=custom", "world.n_users=5", "world.n_videos=3", "world.n_topics=3",
            "world.min_duration_s=1.0", "world.max_duration_s=1.5", "world.fps_choices=[10]",
            f"world.out_dir={out}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"world {out}: 5 users, 3 videos" in printed and "(generated)" in printed
    assert '"skip_quarters"' in printed
    assert main(args) == 0
    assert "up to date, kept" in capsys.readouterr().out
    assert main(["world.n_users=zero"]) == 2
    assert "world.n_users must be an integer" in capsys.readouterr().err
