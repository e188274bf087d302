"""A synthetic world that carries its frame features: the simulation without mp4 files or encoder.

The same users, exposure and hazard process as :mod:`frame_dist.ingest.synthetic`
(:func:`~frame_dist.ingest.synthetic.simulate_world`), written as *user data* plus precomputed
frame features, so a world of any size reaches the graph stage in seconds of CPU:

* every topic k has a fixed feature vector ``t_k`` (F non-negative values, |N(0, 1)|, like the
  pooled output of a ReLU trunk);
* grid frame g of video v (time ``(g + 0.5) / G`` of the video, the extract stage's grid) is
  ``t_k + noise * N(0, I)`` for the topic k of the scene playing then.

Files under ``out_dir``: ``videos.csv`` (``video_id``, ``duration_s``: no ``uri``),
``interactions.csv`` (the "frame" preset plus the true ``p_full`` for ``ingest.truth_column``),
``frames.npy`` (V, G, F) float32 with ``frame_ids.txt`` (one video id per row), and
``scenes.parquet`` / ``truth.parquet`` as the mp4 world writes them. Then::

    python -m jobs.ingest ingest.interactions=<out>/interactions.csv \\
        ingest.videos=<out>/videos.csv ingest.truth_column=p_full \\
        extract.import_path=<out>/frames.npy
    python -m jobs.import_features extract.import_path=<out>/frames.npy \\
        extract.import_ids=<out>/frame_ids.txt extract.import_name=<name> extract.grid_size=<G>

(:func:`import_overrides` gives those settings.) Deterministic in (world config, grid, dim,
noise); :func:`write_feature_world` rewrites nothing when ``feature_world.json`` already
describes the same world.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import fsspec
import numpy as np

from feature_store.store import write_atomic
from frame_dist.config import WorldConfig
from frame_dist.ingest.synthetic import (
    GENERATOR_VERSION,
    World,
    _paths,
    _validated,
    simulate_world,
    write_tables,
)

FEATURES_NPY = "frames.npy"
FEATURE_IDS = "frame_ids.txt"
META = "feature_world.json"
_FEATURE_TAG = 0x46454154  # spawn key of the feature stream (independent of the world's streams)


@dataclass(frozen=True)
class FeatureSpec:
    """How frames look: G grid frames per video, F values per frame, per-frame noise std."""

    grid: int = 16
    dim: int = 256
    noise: float = 1.0

    def __post_init__(self) -> None:
        if self.grid <= 0 or self.dim <= 0 or not self.noise >= 0:
            raise ValueError(f"FeatureSpec: grid={self.grid} and dim={self.dim} must be > 0, "
                             f"noise={self.noise} >= 0")


def frame_topics(world: World, grid: int) -> np.ndarray:
    """(V, G) topic of the scene playing at each grid time (g + 0.5) / G of each video."""
    lay = world.layout
    times = (np.arange(grid) + 0.5) / grid * lay.duration_s[:, None]  # (V, G) seconds
    n_scenes = np.diff(lay.scene_ptr)
    topics = np.empty(times.shape, dtype=np.int64)
    for v in range(lay.n_videos):
        lo, hi = lay.scene_ptr[v], lay.scene_ptr[v + 1]
        k = np.searchsorted(lay.scene_end_s[lo:hi], times[v], side="right")
        topics[v] = lay.scene_topic[lo + np.minimum(k, n_scenes[v] - 1)]
    return topics


def frame_features(world: World, spec: FeatureSpec) -> np.ndarray:
    """(V, G, F) float32 frame features of the world (see the module docstring)."""
    rng = np.random.default_rng(np.random.SeedSequence(world.config.seed,
                                                       spawn_key=(_FEATURE_TAG,)))
    topic_vectors = np.abs(rng.standard_normal((world.config.n_topics, spec.dim)))
    topics = frame_topics(world, spec.grid)
    noise = rng.standard_normal((*topics.shape, spec.dim)) * spec.noise
    return (topic_vectors[topics] + noise).astype(np.float32)


@dataclass(frozen=True)
class FeatureWorld:
    """Where a feature world lives (absolute paths) and the simulation behind it."""

    out_dir: str
    interactions_csv: str
    videos_csv: str
    features_npy: str
    feature_ids: str
    spec: FeatureSpec
    world: World

    def import_overrides(self, name: str) -> list[str]:
        """Config overrides that ingest this world and import its features as external:name."""
        return [f"ingest.interactions={self.interactions_csv}",
                f"ingest.videos={self.videos_csv}", "ingest.truth_column=p_full",
                f"extract.import_path={self.features_npy}",
                f"extract.import_ids={self.feature_ids}", f"extract.import_name={name}",
                f"extract.grid_size={self.spec.grid}"]


def write_feature_world(cfg: WorldConfig, spec: FeatureSpec, out_dir: str) -> FeatureWorld:
    """Simulate ``cfg`` and write its tables and frame features under ``out_dir``.

    The simulation runs every time (seconds; callers need the World for the ceiling); files are
    rewritten only when ``feature_world.json`` does not describe this very world.
    """
    cfg = _validated(dataclasses.replace(cfg, out_dir=out_dir))
    out_dir = os.path.abspath(out_dir)
    world = simulate_world(cfg)
    paths = _paths(out_dir)
    found = FeatureWorld(out_dir, paths["interactions_csv"], paths["videos_csv"],
                         os.path.join(out_dir, FEATURES_NPY), os.path.join(out_dir, FEATURE_IDS),
                         spec, world)
    meta = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg),
            "features": dataclasses.asdict(spec)}
    meta["config"].pop("out_dir")
    meta_path = os.path.join(out_dir, META)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            try:
                if json.load(f) == json.loads(json.dumps(meta)):
                    return found
            except json.JSONDecodeError:
                pass  # unreadable: regenerate
        os.remove(meta_path)  # the files below are about to change
    os.makedirs(out_dir, exist_ok=True)
    write_tables(world, paths, with_uris=False, truth_column=True)
    local = fsspec.filesystem("file")
    features = frame_features(world, spec)
    with local.open(found.features_npy + ".part", "wb") as f:
        np.save(f, features)
    os.replace(found.features_npy + ".part", found.features_npy)
    write_atomic(local, found.feature_ids,
                 ("\n".join(world.layout.video_ids.tolist()) + "\n").encode())
    write_atomic(local, meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
    return found
