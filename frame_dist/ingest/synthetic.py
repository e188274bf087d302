"""The synthetic micro-video world: real mp4 files and simulated users who skip what they dislike.

This is the project's embedded default data. Everything is a deterministic function of
:class:`~frame_dist.config.WorldConfig` (and its ``seed``):

* **Videos.** Each video is a sequence of scenes with random boundaries (not aligned to any clip
  grid); each scene shows one of ``n_topics`` visual topics. A topic is a colour pair *and* a
  pattern (stripes of three orientations, checkerboard, rings, dots, pinwheel, zigzag) whose phase
  moves over time, plus a little pixel noise. Frames are rendered with numpy and written as real
  H.264 mp4 files (libx264, yuv420p) with PyAV; one encoder thread and no mbtree, so the same
  config always gives the same bytes.
* **Users.** User u has a taste ``taste[u, k]`` for every topic k: with probability
  ``dislike_fraction`` a topic is disliked (negative taste), otherwise liked; the magnitude is
  ``taste_sharpness * (TASTE_FLOOR + |z|)``, z ~ N(0, 1). User u also has an impatience factor
  ``imp[u]`` (log-normal, median 1, spread ``impatience_sigma``) that scales the background skip
  rate.
* **Exposure.** User u is shown ``clip(Poisson(interactions_per_user), 3, n_videos)`` distinct
  videos, drawn without replacement with Zipf popularity weights (Gumbel top-k), watched in a
  random order with increasing integer timestamps.
* **Watching is a hazard process.** While a scene of topic k plays, user u skips at rate

      h_u(k) = base_hazard * imp[u] + dislike_hazard * sigmoid(-taste[u, k])   (per second).

  Skips can happen only in the first :data:`SKIP_HORIZON` of a video: a user who has seen 98% of
  it finishes it, so every simulated skip has watch ratio < 0.98 and every full watch ratio >= 1,
  exactly the labels ingest computes with its default ``full_watch_tolerance = 0.02``. With the
  cumulative hazard H_uv(t) = integral_0^t h, piecewise linear over scenes,

      p_full(u, v) = exp(-H_uv(SKIP_HORIZON * duration_v))

  exactly, and a skip time is drawn by inversion: E ~ Exp(1); the user skips at the t where
  H_uv(t) = E, or watches to the end when E >= H_uv(horizon). A full watch plays the whole video,
  sometimes more (a replay of up to :data:`REPLAY_MAX` of it).

Outputs under ``cfg.out_dir``: ``videos/<video_id>.mp4``, ``videos.csv``, ``interactions.csv``
(the "frame" column preset of ingest), ``truth.parquet`` (:data:`~feature_store.schemas.TRUTH`: the
exact p_full of every interaction), ``scenes.parquet`` (the ground-truth timeline) and, written
last and atomically, ``world.json`` (config, counts, generator version). A run killed midway leaves
no ``world.json`` and is regenerated from scratch by the next call.

The simulation is factored from the I/O: :func:`simulate_world` builds every table in memory
without rendering, :func:`simulate_watches` re-runs the watching process on any interactions.

CLI: ``python -m frame_dist.ingest.synthetic --config configs/world_medium.yaml [--force] key=value
...``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from tqdm import tqdm

from feature_store.schemas import SCENES, TRUTH, conform
from feature_store.store import write_atomic
from frame_dist.config import Config, ConfigError, WorldConfig, load_config

# Bump whenever the same config would produce a different world (tables or pixels).
GENERATOR_VERSION = 1

# ---- user model (fixed shape; the config scales it) ----
TASTE_FLOOR = 1.0  # |taste| >= taste_sharpness * TASTE_FLOOR: liked and disliked are well apart
SKIP_HORIZON = 0.98  # skips happen in [0, 0.98 * duration); = 1 - ingest's full_watch_tolerance
REPLAY_PROBABILITY = 0.25  # a full watch is followed by a partial replay this often
REPLAY_MAX = 0.3  # a replay adds up to this fraction of the duration to the play time
MIN_SHOWN = 3  # every user is shown at least this many videos (when there are that many)

# ---- exposure and timeline ----
ZIPF_EXPONENT = 1.0  # popularity of the video of popularity rank r is proportional to r^-a
START_TIMESTAMP = 1_700_000_000  # unix seconds; users start within HISTORY_WINDOW_S after it
HISTORY_WINDOW_S = 30 * 86_400
MEAN_GAP_S = 120.0  # mean idle time between two views of a user

# ---- rendering ----
NOISE_SIGMA = 3.0  # std of the uniform pixel noise (0..255): small next to colour/pattern contrast
PATTERN_KINDS = 8  # topics k and k + 8 share a pattern kind (at a different spatial frequency)
# mbtree=0: libx264's macroblock-tree rate control made repeated encodes of identical frames
# differ (measured with PyAV 18); without it the bytes are reproducible.
X264_OPTIONS = {"crf": "18", "preset": "veryfast", "x264-params": "mbtree=0"}


VIDEOS_CSV = "videos.csv"
INTERACTIONS_CSV = "interactions.csv"
TRUTH_PARQUET = "truth.parquet"
SCENES_PARQUET = "scenes.parquet"
META_JSON = "world.json"
VIDEOS_DIR = "videos"

# Independent random streams, so e.g. changing interactions_per_user keeps the videos.
_STREAMS = ("layout", "users", "exposure", "watch", "timeline")
_RENDER_TAG = 0x52454E44  # spawn key of the per-video rendering streams


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class VideoLayout:
    """Videos and their scene timelines; scenes are stored CSR-style by video."""

    video_ids: np.ndarray  # (N,) str, "v00017"
    fps: np.ndarray  # (N,) int
    n_frames: np.ndarray  # (N,) int, round(drawn duration * fps)
    duration_s: np.ndarray  # (N,) float, n_frames / fps (what a decoder reports)
    width: np.ndarray  # (N,) int, even
    height: np.ndarray  # (N,) int, even
    popularity: np.ndarray  # (N,) exposure weights, sum 1
    scene_ptr: np.ndarray  # (N + 1,) scenes of video v are scene_ptr[v]:scene_ptr[v + 1]
    scene_start_s: np.ndarray  # (S,)
    scene_end_s: np.ndarray  # (S,)
    scene_topic: np.ndarray  # (S,) int, consecutive scenes of a video differ

    @property
    def n_videos(self) -> int:
        return len(self.video_ids)

    @property
    def scene_video(self) -> np.ndarray:
        """(S,) the video index of every scene."""
        return np.repeat(np.arange(self.n_videos), np.diff(self.scene_ptr))


@dataclass(frozen=True)
class Users:
    """Simulated users: a taste per topic (negative = disliked) and an impatience factor."""

    user_ids: np.ndarray  # (M,) str, "u0042"
    taste: np.ndarray  # (M, K)
    impatience: np.ndarray  # (M,) multiplies base_hazard

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class WatchOutcome:
    """The result of the watching process for I interactions."""

    p_full: np.ndarray  # (I,) exact probability of a full watch
    full: np.ndarray  # (I,) bool, the drawn outcome
    play_time_s: np.ndarray  # (I,) skip time, or duration (plus a replay) for a full watch
    skip_scene: np.ndarray  # (I,) global scene index of the skip, -1 for a full watch
    skip_disliked: np.ndarray  # (I,) bool, the skip happened during a disliked scene


@dataclass(frozen=True)
class World:
    """Every table of the world in memory (no pixels): what :func:`generate_world` writes."""

    config: WorldConfig
    layout: VideoLayout
    users: Users
    user_index: np.ndarray  # (I,) grouped by user, in viewing order
    video_index: np.ndarray  # (I,)
    timestamp: np.ndarray  # (I,) int64 unix seconds, strictly increasing per user
    outcome: WatchOutcome

    @property
    def n_interactions(self) -> int:
        return len(self.user_index)


@dataclass(frozen=True)
class WorldInfo:
    """Where a generated world lives, and its headline counts."""

    out_dir: Path  # absolute
    videos_dir: Path  # videos/<video_id>.mp4
    videos_csv: Path
    interactions_csv: Path
    truth_parquet: Path
    scenes_parquet: Path
    meta_json: Path  # world.json, written last
    n_users: int
    n_videos: int
    n_interactions: int
    full_watch_rate: float
    regenerated: bool  # False: an identical world was already there and was kept

    def summary(self) -> str:
        return (f"world {self.out_dir}: {self.n_users} users, {self.n_videos} videos, "
                f"{self.n_interactions} interactions, full-watch rate {self.full_watch_rate:.3f}"
                f" ({'generated' if self.regenerated else 'up to date, kept'})")


# --------------------------------------------------------------------------- simulation


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(_STREAMS, children)}


def _ids(prefix: str, n: int, width: int) -> np.ndarray:
    width = max(width, len(str(max(n - 1, 0))))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def make_layout(cfg: WorldConfig, rng: np.random.Generator) -> VideoLayout:
    """Draw the videos: frame rate, size, duration, scene boundaries and topics, popularity.

    Scene j of a video lasts ``duration * (0.5 / n + 0.5 * g_j / sum(g))``, g ~ Gamma(2): random
    boundaries, yet no scene shorter than half its even share. Consecutive scenes show different
    topics. A video never has more scenes than frames.
    """
    n, k = cfg.n_videos, cfg.n_topics
    fps = np.asarray(cfg.fps_choices, dtype=np.int64)[rng.integers(0, len(cfg.fps_choices), n)]
    drawn = rng.uniform(cfg.min_duration_s, cfg.max_duration_s, n)
    n_frames = np.maximum(1, np.floor(drawn * fps + 0.5)).astype(np.int64)
    duration = n_frames / fps
    sizes = np.asarray(cfg.sizes, dtype=np.int64).reshape(-1, 2)
    size = sizes[rng.integers(0, len(sizes), n)]
    n_scenes = np.minimum(rng.integers(cfg.min_scenes, cfg.max_scenes + 1, n), n_frames)

    slots = np.arange(cfg.max_scenes)[None, :] < n_scenes[:, None]  # (N, max_scenes)
    g = rng.gamma(2.0, size=(n, cfg.max_scenes)) * slots
    share = (0.5 / n_scenes[:, None] + 0.5 * g / g.sum(axis=1, keepdims=True)) * slots
    ends = np.cumsum(share, axis=1) * duration[:, None]
    ends[np.arange(n), n_scenes - 1] = duration  # exact end despite rounding
    starts = np.concatenate([np.zeros((n, 1)), ends[:, :-1]], axis=1)

    first = rng.integers(0, k, n)
    steps = rng.integers(1, k, (n, cfg.max_scenes)) if k > 1 else np.zeros((n, cfg.max_scenes),
                                                                           dtype=np.int64)
    steps[:, 0] = 0
    topics = (first[:, None] + np.cumsum(steps, axis=1)) % k

    rank = rng.permutation(n) + 1
    weight = rank.astype(np.float64) ** -ZIPF_EXPONENT
    return VideoLayout(
        video_ids=_ids("v", n, 5),
        fps=fps,
        n_frames=n_frames,
        duration_s=duration,
        width=size[:, 0].copy(),
        height=size[:, 1].copy(),
        popularity=weight / weight.sum(),
        scene_ptr=np.concatenate([[0], np.cumsum(n_scenes)]).astype(np.int64),
        scene_start_s=starts[slots],
        scene_end_s=ends[slots],
        scene_topic=topics[slots].astype(np.int64),
    )


def make_users(cfg: WorldConfig, rng: np.random.Generator) -> Users:
    """Draw tastes ``s * taste_sharpness * (TASTE_FLOOR + |z|)``, s = -1 with probability
    ``dislike_fraction``, and impatience factors (log-normal, spread ``impatience_sigma``)."""
    m, k = cfg.n_users, cfg.n_topics
    magnitude = cfg.taste_sharpness * (TASTE_FLOOR + np.abs(rng.standard_normal((m, k))))
    sign = np.where(rng.random((m, k)) < cfg.dislike_fraction, -1.0, 1.0)
    impatience = rng.lognormal(0.0, cfg.impatience_sigma, m)
    return Users(user_ids=_ids("u", m, 4), taste=sign * magnitude, impatience=impatience)


def expose(cfg: WorldConfig, layout: VideoLayout, n_users: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Which videos each user is shown, grouped by user in viewing order.

    Sampling without replacement proportional to popularity is the top-k of
    ``log(popularity) + Gumbel noise``; the viewing order is then random.
    Returns ``(user_index, video_index)``, both (I,).
    """
    n = layout.n_videos
    counts = np.clip(rng.poisson(cfg.interactions_per_user, n_users), min(MIN_SHOWN, n), n)
    log_pop = np.log(layout.popularity)
    rows = max(1, (1 << 22) // n)  # bound the (users x videos) key block to ~32 MiB
    users, videos = [], []
    for lo in range(0, n_users, rows):
        hi = min(n_users, lo + rows)
        keys = log_pop[None, :] + rng.gumbel(size=(hi - lo, n))  # (m, N)
        order = np.argsort(-keys, axis=1, kind="stable")
        take = np.arange(n)[None, :] < counts[lo:hi, None]
        users.append(np.nonzero(take)[0] + lo)
        videos.append(order[take])
    user_index = np.concatenate(users)
    video_index = np.concatenate(videos)
    viewing = np.lexsort((rng.random(len(user_index)), user_index))
    return user_index[viewing], video_index[viewing]


def scene_rows(layout: VideoLayout, video_index: np.ndarray, until: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One row per (interaction, scene of its video), interaction by interaction.

    ``until`` (I,): seconds of each interaction's video played. Returns ``row`` (R,) the
    interaction of each row, ``first`` (I,) each interaction's first row, ``scene`` (R,) global
    scene index, ``start`` (R,) scene start and ``exposed`` (R,) seconds of the scene played
    before ``until`` (0 for later scenes).
    """
    n_scenes = np.diff(layout.scene_ptr)[video_index]  # (I,)
    row = np.repeat(np.arange(len(video_index)), n_scenes)  # (R,)
    first = np.cumsum(n_scenes) - n_scenes  # (I,)
    scene = layout.scene_ptr[video_index][row] + (np.arange(len(row)) - first[row])  # (R,)
    start = layout.scene_start_s[scene]
    exposed = np.clip(np.minimum(layout.scene_end_s[scene], until[row]) - start, 0.0, None)
    return row, first, scene, start, exposed


def _hazard_segments(layout: VideoLayout, users: Users, user_index: np.ndarray,
                     video_index: np.ndarray, base_hazard: float, dislike_hazard: float
                     ) -> dict[str, np.ndarray]:
    """One row per (interaction, scene) inside the skip horizon, with its constant hazard.

    Returns arrays over the R = sum of scene counts rows: ``row_interaction``, ``scene``,
    ``start``, ``length`` (clipped to the horizon), ``hazard``, and ``cum_before`` /
    ``cum_after`` (the cumulative hazard H at the segment's ends), plus ``total`` (I,) = H at
    the horizon.
    """
    horizon = SKIP_HORIZON * layout.duration_s[video_index]  # (I,)
    row_interaction, first_row, scene, start, length = scene_rows(layout, video_index, horizon)
    u = user_index[row_interaction]
    taste = users.taste[u, layout.scene_topic[scene]]
    dislike = 0.5 * (1.0 - np.tanh(0.5 * taste))  # sigmoid(-taste), stable for any taste
    hazard = base_hazard * users.impatience[u] + dislike_hazard * dislike
    cum_after = np.cumsum(hazard * length)
    offset = np.concatenate([[0.0], cum_after])[first_row]  # cumsum before each interaction
    cum_after = cum_after - offset[row_interaction]
    cum_before = cum_after - hazard * length
    total = np.zeros(len(video_index))
    np.add.at(total, row_interaction, hazard * length)
    return dict(row_interaction=row_interaction, scene=scene, start=start, length=length,
                hazard=hazard, taste=taste, cum_before=cum_before, cum_after=cum_after,
                total=total)


def full_watch_probability(layout: VideoLayout, users: Users, user_index: np.ndarray,
                           video_index: np.ndarray, *, base_hazard: float,
                           dislike_hazard: float) -> np.ndarray:
    """Exact p_full = exp(-H_uv(SKIP_HORIZON * duration_v)) per interaction, (I,)."""
    seg = _hazard_segments(layout, users, user_index, video_index, base_hazard, dislike_hazard)
    return np.exp(-seg["total"])


def simulate_watches(layout: VideoLayout, users: Users, user_index: np.ndarray,
                     video_index: np.ndarray, rng: np.random.Generator, *, base_hazard: float,
                     dislike_hazard: float) -> WatchOutcome:
    """Run the hazard process once for every interaction (vectorised over interaction x scene).

    E ~ Exp(1); skip inside the segment with H(start) < E <= H(end), at
    t = start + (E - H(start)) / h; a full watch when E >= H(horizon).
    """
    seg = _hazard_segments(layout, users, user_index, video_index, base_hazard, dislike_hazard)
    n = len(video_index)
    e = rng.standard_exponential(n)
    replay = np.where(rng.random(n) < REPLAY_PROBABILITY, rng.uniform(0.0, REPLAY_MAX, n), 0.0)
    duration = layout.duration_s[video_index]
    full = e >= seg["total"]

    e_row = e[seg["row_interaction"]]
    hit = np.flatnonzero((seg["cum_before"] < e_row) & (e_row <= seg["cum_after"]))
    hit_i = seg["row_interaction"][hit]  # each skipped interaction exactly once
    skip_t = seg["start"][hit] + (e_row[hit] - seg["cum_before"][hit]) / seg["hazard"][hit]
    limit = np.nextafter(SKIP_HORIZON * duration[hit_i], 0.0)

    play = duration * (1.0 + replay)
    play[hit_i] = np.minimum(skip_t, limit)
    skip_scene = np.full(n, -1, dtype=np.int64)
    skip_scene[hit_i] = seg["scene"][hit]
    skip_disliked = np.zeros(n, dtype=bool)
    skip_disliked[hit_i] = seg["taste"][hit] < 0
    if len(hit_i) != int((~full).sum()):  # a broken invariant, not bad input
        raise RuntimeError(f"hazard inversion found {len(hit_i)} skips for "
                           f"{int((~full).sum())} skipped interactions")
    return WatchOutcome(p_full=np.exp(-seg["total"]), full=full, play_time_s=play,
                        skip_scene=skip_scene, skip_disliked=skip_disliked)


def _timestamps(user_index: np.ndarray, play_time_s: np.ndarray, n_users: int,
                rng: np.random.Generator) -> np.ndarray:
    """Strictly increasing int seconds per user: start + previous play times + idle gaps."""
    start = START_TIMESTAMP + rng.integers(0, HISTORY_WINDOW_S, n_users)
    step = np.ceil(play_time_s).astype(np.int64) + 1 + np.floor(
        rng.exponential(MEAN_GAP_S, len(user_index))).astype(np.int64)
    cum = np.cumsum(step)
    first = np.flatnonzero(np.r_[True, user_index[1:] != user_index[:-1]])
    before_group = np.concatenate([[0], cum])[first]  # total of earlier users' steps
    group = np.cumsum(np.r_[True, user_index[1:] != user_index[:-1]]) - 1
    since_start = cum - step - before_group[group]  # exclusive cumsum within the user
    return start[user_index] + since_start


def simulate_world(cfg: WorldConfig) -> World:
    """Build every table of the world in memory, without rendering a single frame."""
    cfg = _validated(cfg)
    rngs = _streams(cfg.seed)
    layout = make_layout(cfg, rngs["layout"])
    users = make_users(cfg, rngs["users"])
    user_index, video_index = expose(cfg, layout, users.n_users, rngs["exposure"])
    outcome = simulate_watches(layout, users, user_index, video_index, rngs["watch"],
                               base_hazard=cfg.base_hazard, dislike_hazard=cfg.dislike_hazard)
    timestamp = _timestamps(user_index, outcome.play_time_s, users.n_users, rngs["timeline"])
    return World(config=cfg, layout=layout, users=users, user_index=user_index,
                 video_index=video_index, timestamp=timestamp, outcome=outcome)


def world_stats(world: World) -> dict[str, Any]:
    """Counts and shape of the world (what world.json reports)."""
    o, lay = world.outcome, world.layout
    skipped = ~o.full
    ratio = o.play_time_s[skipped] / lay.duration_s[world.video_index[skipped]]
    quarters = np.bincount(np.minimum((ratio * 4).astype(np.int64), 3), minlength=4)
    scene_len = lay.scene_end_s - lay.scene_start_s
    dislikers = (world.users.taste < 0).mean(axis=0)  # (K,) share of users disliking topic k
    disliked_time = float((scene_len * dislikers[lay.scene_topic]).sum())
    n_skips = int(skipped.sum())
    return {
        "users": world.users.n_users,
        "videos": lay.n_videos,
        "scenes": len(lay.scene_topic),
        "frames": int(lay.n_frames.sum()),
        "interactions": world.n_interactions,
        "full_watches": int(o.full.sum()),
        "full_watch_rate": float(o.full.mean()) if world.n_interactions else 0.0,
        "mean_p_full": float(o.p_full.mean()) if world.n_interactions else 0.0,
        "skips": n_skips,
        "skip_quarters": [int(c) for c in quarters],  # skips by position: 1st..4th quarter
        # Share of skips that happened during a disliked scene, next to the share of screen
        # time that disliked scenes take (over all user x scene pairs): "skips follow dislikes".
        "skips_in_disliked_scene": float(o.skip_disliked[skipped].mean()) if n_skips else 0.0,
        "disliked_time_share": disliked_time / float(scene_len.sum()),
    }


# --------------------------------------------------------------------------- rendering


def _hsv_to_rgb(h: np.ndarray, s: float | np.ndarray, v: float | np.ndarray) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    s = np.asarray(s, dtype=np.float64)[..., None]
    v = np.asarray(v, dtype=np.float64)[..., None]
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def topic_palette(n_topics: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours (K, 3) on a 0..255 scale.

    Foreground hues are evenly spaced (bright, brightness alternating); backgrounds are dark
    tints of the opposite hue, so topics differ in mean colour as well as in pattern.
    """
    k = np.arange(n_topics)
    hue = k / n_topics
    fg = _hsv_to_rgb(hue, 0.85, np.where(k % 2 == 0, 0.95, 0.75)) * 255.0
    bg = _hsv_to_rgb((hue + 0.5) % 1.0, 0.6, np.where(k % 3 == 0, 0.3, 0.15)) * 255.0
    return fg, bg


def topic_pattern(topic: int, x: np.ndarray, y: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Pattern intensity in [0, 1] of a topic, broadcast over (frames, rows, cols).

    ``x``, ``y``: pixel coordinates in units of the frame's short side, shapes (1, 1, W) and
    (1, H, 1); ``phase``: (F, 1, 1) in cycles, advancing with time (the motion).
    Kinds (topic mod 8): horizontal, vertical, diagonal stripes, checkerboard, rings, dots,
    pinwheel, zigzag; topics >= 8 reuse a kind at a higher spatial frequency.
    """
    kind = topic % PATTERN_KINDS
    f = 3.0 * (1.0 + 0.5 * (topic // PATTERN_KINDS))  # cycles per short side
    two_pi = 2.0 * np.pi
    cx, cy = x.max() / 2.0, y.max() / 2.0
    if kind == 0:
        wave = np.sin(two_pi * (f * y - phase))
    elif kind == 1:
        wave = np.sin(two_pi * (f * x - phase))
    elif kind == 2:
        wave = np.sin(two_pi * (f * (x + y) / np.sqrt(2.0) - phase))
    elif kind == 3:
        wave = np.sin(two_pi * (f * x - phase)) * np.sin(two_pi * f * y) * 2.0
    elif kind == 4:
        wave = np.sin(two_pi * (f * np.hypot(x - cx, y - cy) - phase))
    elif kind == 5:
        wave = (np.cos(two_pi * (f * x - phase)) + np.cos(two_pi * f * y) - 1.0) * 1.5
    elif kind == 6:
        wave = np.sin(6.0 * np.arctan2(y - cy, x - cx) - two_pi * phase)
    else:
        wave = np.sin(two_pi * (f * y - phase) + 2.0 * np.sin(two_pi * f * x))
    level = 0.5 + 0.5 * np.tanh(3.0 * wave)
    return np.broadcast_to(level, np.broadcast_shapes(phase.shape, y.shape, x.shape))


def render_video(layout: VideoLayout, v: int, n_topics: int, seed: int) -> np.ndarray:
    """All frames of video ``v`` as uint8 RGB, (F, H, W, 3); frame i shows time i / fps."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_RENDER_TAG, v)))
    f, h, w = int(layout.n_frames[v]), int(layout.height[v]), int(layout.width[v])
    lo, hi = int(layout.scene_ptr[v]), int(layout.scene_ptr[v + 1])
    t = np.arange(f) / layout.fps[v]  # (F,)
    scene_of_frame = np.searchsorted(layout.scene_end_s[lo:hi], t, side="right")  # (F,)
    scene_of_frame = np.minimum(scene_of_frame, hi - lo - 1)
    short = float(min(h, w))
    x = (np.arange(w, dtype=np.float32) / short)[None, None, :]  # (1, 1, W)
    y = (np.arange(h, dtype=np.float32) / short)[None, :, None]  # (1, H, 1)
    fg, bg = (c.astype(np.float32) for c in topic_palette(n_topics))
    offsets = rng.random(hi - lo)  # each scene starts its pattern at a random phase
    speeds = rng.uniform(0.3, 0.8, hi - lo) * rng.choice([-1.0, 1.0], hi - lo)  # cycles / s
    level = np.empty((f, h, w), dtype=np.float32)  # pattern intensity in [0, 1]
    for j in range(hi - lo):
        idx = np.flatnonzero(scene_of_frame == j)
        if len(idx):
            phase = (offsets[j] + speeds[j] * t[idx]).astype(np.float32)[:, None, None]
            level[idx] = topic_pattern(int(layout.scene_topic[lo + j]), x, y, phase)
    topic = layout.scene_topic[lo + scene_of_frame]  # (F,)
    base, span = bg[topic], fg[topic] - bg[topic]  # (F, 3) colour at level 0, level 1 - 0
    # Uniform noise of standard deviation NOISE_SIGMA (4x cheaper to draw than Gaussian).
    noise = rng.random((3, f, h, w), dtype=np.float32)
    frames = np.empty((f, h, w, 3), dtype=np.uint8)
    for c in range(3):  # channel planes are contiguous: ~2x faster than (F, H, W, 3) broadcasts
        plane = noise[c]
        plane -= 0.5
        plane *= NOISE_SIGMA * np.sqrt(12.0)
        plane += base[:, c, None, None]
        plane += span[:, c, None, None] * level
        np.clip(np.rint(plane, out=plane), 0, 255, out=plane)
        frames[..., c] = plane
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """Write RGB frames (F, H, W, 3) as H.264/yuv420p mp4; pts = frame index, time base 1/fps.

    Reproducible bytes: one encoder thread and no macroblock-tree rate control (``mbtree=0``);
    with mbtree on, libx264 gave different bytes for identical frames in repeated runs.
    """
    n, h, w, _ = frames.shape
    time_base = Fraction(1, int(fps))
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.time_base = time_base
        stream.codec_context.thread_count = 1
        stream.options = dict(X264_OPTIONS)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts, frame.time_base = i, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# --------------------------------------------------------------------------- writing


def _validated(cfg: WorldConfig) -> WorldConfig:
    """A checked copy of ``cfg`` (ConfigError names the field, e.g. ``world.n_users``)."""
    if not isinstance(cfg, WorldConfig):
        raise ConfigError(f"world config must be a WorldConfig, got {type(cfg).__name__}")
    checked = copy.deepcopy(cfg)
    Config(world=checked).validate()
    if "://" in checked.out_dir and not checked.out_dir.startswith("file://"):
        raise ConfigError(f"world.out_dir={checked.out_dir!r} must be a local directory (the "
                          "mp4 files are written with PyAV); copy the world to S3 afterwards")
    return checked


def _config_dict(cfg: WorldConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as world.json


def _paths(out_dir: str) -> dict[str, str]:
    return {
        "videos_dir": os.path.join(out_dir, VIDEOS_DIR),
        "videos_csv": os.path.join(out_dir, VIDEOS_CSV),
        "interactions_csv": os.path.join(out_dir, INTERACTIONS_CSV),
        "truth_parquet": os.path.join(out_dir, TRUTH_PARQUET),
        "scenes_parquet": os.path.join(out_dir, SCENES_PARQUET),
        "meta_json": os.path.join(out_dir, META_JSON),
    }


def _info(out_dir: str, meta: dict[str, Any], regenerated: bool) -> WorldInfo:
    c = meta["counts"]
    paths = {key: Path(path) for key, path in _paths(out_dir).items()}
    return WorldInfo(out_dir=Path(out_dir), **paths, n_users=c["users"], n_videos=c["videos"],
                     n_interactions=c["interactions"], full_watch_rate=c["full_watch_rate"],
                     regenerated=regenerated)


def _read_meta(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: treat as an unfinished world and regenerate
    return meta if isinstance(meta, dict) else None


def _clear(out_dir: str) -> None:
    """Remove what a previous world wrote (world.json first: the world is invalid from now)."""
    paths = _paths(out_dir)
    for key in ("meta_json", "videos_csv", "interactions_csv", "truth_parquet", "scenes_parquet"):
        if os.path.exists(paths[key]):
            os.remove(paths[key])
    videos_dir = paths["videos_dir"]
    if os.path.isdir(videos_dir):
        for name in os.listdir(videos_dir):
            if name.endswith(".mp4") or name.endswith(".mp4.part"):
                os.remove(os.path.join(videos_dir, name))


def write_tables(world: World, paths: dict[str, str], with_uris: bool = True,
                 truth_column: bool = False) -> None:
    """videos.csv, interactions.csv, truth.parquet and scenes.parquet at ``paths``.

    ``with_uris=False`` leaves the ``uri`` column out of videos.csv, ``truth_column=True`` adds
    ``p_full`` to interactions.csv (``ingest.truth_column``): a world read as user data, whose
    frame features are imported (``frame_dist.ingest.feature_world``).
    """
    lay = world.layout
    videos = {"video_id": lay.video_ids.tolist()}
    if with_uris:
        videos["uri"] = [os.path.join(paths["videos_dir"], f"{vid}.mp4")
                         for vid in lay.video_ids]
    videos["duration_s"] = lay.duration_s
    pa_csv.write_csv(pa.table(videos), paths["videos_csv"])

    # A log in time order (ties by user), the way a platform would export it.
    order = np.lexsort((world.user_index, world.timestamp))
    u, v = world.user_index[order], world.video_index[order]
    user_ids = world.users.user_ids[u].tolist()
    video_ids = lay.video_ids[v].tolist()
    interactions = pa.table({
        "user_id": user_ids,
        "video_id": video_ids,
        "play_time_s": world.outcome.play_time_s[order],
        "duration_s": lay.duration_s[v],
        "timestamp": world.timestamp[order].astype(np.int64),
    })
    if truth_column:
        interactions = interactions.append_column("p_full", pa.array(world.outcome.p_full[order]))
    pa_csv.write_csv(interactions, paths["interactions_csv"])

    truth = pa.table({"user_id": user_ids, "video_id": video_ids,
                      "timestamp": world.timestamp[order].astype(np.int64),
                      "p_full": world.outcome.p_full[order]})
    pq.write_table(conform(truth, TRUTH, "truth"), paths["truth_parquet"])

    scene_video = lay.scene_video
    within = np.arange(len(scene_video)) - lay.scene_ptr[scene_video]
    scenes = pa.table({
        "video_id": lay.video_ids[scene_video].tolist(),
        "scene_index": within.astype(np.int32),
        "start_s": lay.scene_start_s,
        "end_s": lay.scene_end_s,
        "topic": lay.scene_topic.astype(np.int32),
    })
    pq.write_table(conform(scenes, SCENES, "scenes"), paths["scenes_parquet"])


def _render_all(world: World, videos_dir: str) -> None:
    lay, cfg = world.layout, world.config
    os.makedirs(videos_dir, exist_ok=True)
    for v in tqdm(range(lay.n_videos), desc="render videos", unit="video", disable=None):
        frames = render_video(lay, v, cfg.n_topics, cfg.seed)
        final = os.path.join(videos_dir, f"{lay.video_ids[v]}.mp4")
        part = final + ".part"
        write_mp4(part, frames, int(lay.fps[v]))
        os.replace(part, final)


def generate_world(cfg: WorldConfig, *, force: bool = False) -> WorldInfo:
    """Write the world described by ``cfg`` under ``cfg.out_dir`` (see the module docstring).

    Idempotent: when ``world.json`` exists with this generator version, an equal config and the
    same absolute directory, nothing is rewritten (``WorldInfo.regenerated`` is False) unless
    ``force``. Otherwise the old world's files are removed and everything is regenerated;
    ``world.json`` is written last, atomically.
    """
    cfg = _validated(cfg)
    out_dir = os.path.abspath(cfg.out_dir.removeprefix("file://"))
    paths = _paths(out_dir)
    meta = _read_meta(paths["meta_json"])
    if (not force and meta is not None and meta.get("generator_version") == GENERATOR_VERSION
            and meta.get("config") == _config_dict(cfg) and meta.get("out_dir") == out_dir):
        return _info(out_dir, meta, regenerated=False)

    began = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    _clear(out_dir)
    world = simulate_world(cfg)
    _render_all(world, paths["videos_dir"])
    write_tables(world, paths)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "out_dir": out_dir,
        "config": _config_dict(cfg),
        "counts": world_stats(world),
        "files": {key: os.path.relpath(path, out_dir) for key, path in paths.items()
                  if key != "meta_json"},
        "model": {"taste_floor": TASTE_FLOOR, "skip_horizon": SKIP_HORIZON,
                  "replay_probability": REPLAY_PROBABILITY, "replay_max": REPLAY_MAX,
                  "zipf_exponent": ZIPF_EXPONENT},
        "generation_seconds": round(time.perf_counter() - began, 3),
    }
    write_atomic(fsspec.filesystem("file"), paths["meta_json"],
                 json.dumps(meta, indent=2, sort_keys=True).encode())
    return _info(out_dir, meta, regenerated=True)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m frame_dist.ingest.synthetic --config FILE [--force] key=value ...``"""
    parser = argparse.ArgumentParser(description="Generate the synthetic micro-video world.")
    parser.add_argument("--config", help="YAML config file (defaults apply to missing fields)")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. world.seed=3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        info = generate_world(cfg.world, force=args.force)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(info.summary())
    with open(info.meta_json) as f:
        counts = json.load(f)["counts"]
    print(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
