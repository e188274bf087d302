"""Tiny synthetic worlds and trained runs shared by the test modules (not a test module).

The session fixtures of tests/conftest.py build each world once (``tiny_ingest``, ``tiny_world``,
``score_world``); a module that writes to a store works on its own copy (:func:`copy_store`).

- :data:`TINY_WORLD`: the overrides of the tiny world: 24 users, 10 videos of 1-2 s, a grid of
  :data:`GRID` frames, N_c = 4 in 2 graph shards, a small FRAME, 3 epochs.
- :func:`write_topic_features`: frame features written directly (one random vector per visual
  topic plus noise, at the world's true scene timeline), so that training has something to learn
  without spending the test's time in the ResNet trunk.
- :func:`single_process_training` / :func:`train_and_save`: the plain-torch trainer on the merged
  shards, saved with the training stage's own writer (model.pt, metrics.json, the calibration).
- The score world (:func:`edit_interactions`, :data:`COLD`, :data:`GHOST`), its forward
  reference (:func:`score_reference`), copies without scores (:func:`fresh_copy`) and the top-K
  list helpers (:func:`top_k_lists`, :func:`naive_top_k`, :func:`assert_same_lists`).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from feature_store.frames import commit_frame_parts, frame_features_table, write_frame_part
from feature_store.store import Store
from frame_dist.config import Config, load_config
from frame_dist.graph.shards import load_clip_features, load_shards, read_graph_user_ids
from frame_dist.model.frame import FRAME
from frame_dist.score.pipeline import SCORES_TABLE
from frame_dist.train.artifacts import run_path
from frame_dist.train.trainer import EvalData, TrainData, TrainResult, build_model, train
from frame_dist.train.worker_data import WorkerData
from jobs import ingest as ingest_job

GRID = 8
TINY_WORLD = ["world.preset=custom", "world.n_users=24", "world.n_videos=10",
              "world.interactions_per_user=12", "world.min_duration_s=1",
              "world.max_duration_s=2", f"extract.grid_size={GRID}", "graph.n_clips=4",
              "graph.n_shards=2", "model.dim=16", "model.hidden=32", "train.batch_size=64",
              "train.epochs=3", "train.patience=10", "train.seed=7"]
TOPIC_FEATURES = {"weights": "test-topics", "grid_size": GRID, "dim": 2048, "image_size": 0}

# the score world (tests/test_score.py, tests/test_gpu.py)
SCORE_RUN = "tiny"
SCORE_SETTINGS = [f"train.run_name={SCORE_RUN}", "train.epochs=2", "score.top_k=3",
                  "score.users_per_chunk=5", "score.kernel=eager"]
COLD = ["u0003", "u0011"]  # lose their training rows
GHOST = "ghost"  # interacts only with the video that has no frame features
TOL = 1e-5

World = tuple[Config, Store, list[str]]  # config, store, the overrides that load the config


def ingest_world(root: Path, *extra: str) -> World:
    """Generate the world of :data:`TINY_WORLD` + ``extra`` under ``root`` and ingest it."""
    overrides = [*TINY_WORLD, f"store.root={root}/store", f"world.out_dir={root}/world", *extra]
    assert ingest_job.main(overrides) == 0
    cfg = load_config(None, overrides)
    return cfg, Store.from_config(cfg.store), overrides


def copy_store(store: Store, overrides: list[str], dest: Path, *extra: str,
               ignore: tuple[str, ...] = ()) -> World:
    """A copy of ``store`` at ``dest`` (without the ``ignore`` names) and its config.

    The copy keeps ``world.out_dir``: the world's source files are only read, and the ingest
    fingerprint (their paths) stays that of the committed tables.
    """
    shutil.copytree(store.path(), dest, ignore=shutil.ignore_patterns(*ignore))
    overrides = [*overrides, f"store.root={dest}", *extra]
    return load_config(None, overrides), Store(str(dest)), overrides


def write_topic_features(store: Store, skip: str | None = None,
                         identity: dict | None = None) -> None:
    """Frame features of every video but ``skip``: topic vector x 3 + 5 + noise per grid frame.

    Committed under ``identity`` (default :data:`TOPIC_FEATURES`); pass an encoder's identity
    (``encoder_identity(cfg.extract)``) to make the extract stage take them as its own.
    """
    scenes = store.table("scenes").read().to_pandas()
    rng = np.random.default_rng(0)
    topics = rng.normal(size=(int(scenes["topic"].max()) + 1, 2048))
    ids = [v for v in store.table("videos").read()["video_id"].to_pylist() if v != skip]
    times = np.zeros((len(ids), GRID))
    feats = np.zeros((len(ids), GRID, 2048), np.float32)
    for i, vid in enumerate(ids):  # test data setup: a handful of videos
        sc = scenes[scenes["video_id"] == vid]
        duration = sc["end_s"].max()
        times[i] = (np.arange(GRID) + 0.5) * duration / GRID
        topic = [int(sc[(sc["start_s"] <= t) & (t < sc["end_s"])]["topic"].iloc[0])
                 for t in times[i]]
        feats[i] = topics[topic] * 3 + 5 + rng.normal(size=(GRID, 2048))
    part = write_frame_part(store, frame_features_table(ids, times, feats), ids)
    commit_frame_parts(store, [part], identity or TOPIC_FEATURES)


def single_process_training(cfg: Config, store: Store) -> TrainResult:
    """The plain-torch trainer on the merged shards, batches in the global training order."""
    shard, manifest = load_shards(store, cfg.graph.n_clips, [0, 1])
    features = load_clip_features(store, manifest, shard.video_ids)
    data = WorkerData.from_shard(shard, cfg.graph.n_clips, manifest.n_train, features)
    order = np.argsort(shard.train["order"])
    t, v = shard.train, shard.valid
    table = None
    if cfg.model.trainable_clip_features:
        table = torch.from_numpy(load_clip_features(store, manifest,
                                                    np.arange(manifest.n_videos)))
    model = build_model(cfg.model, features.shape[1], seed=cfg.train.seed, clip_features=table,
                        n_clips_total=manifest.n_videos * cfg.graph.n_clips)
    result = train(model, data.clip_features, data.graph,
                   TrainData(t["user"][order], t["video"][order], t["watched"][order]),
                   EvalData(v["user"], v["video"], v["label"].astype(np.int64)), cfg.train)
    return result


def train_and_save(cfg: Config, store: Store, global_step: int = 0) -> None:
    """:func:`single_process_training`, saved with the training stage's writer."""
    from frame_dist.train.ray_loop import write_outputs

    result = single_process_training(cfg, store)
    model = build_model(cfg.model, 2048, seed=cfg.train.seed)
    model.load_state_dict(result.best_state)
    state = dataclasses.replace(result.state, global_step=global_step,
                                fingerprint="test-fingerprint")
    write_outputs(cfg, store, model, state, {}, result.calibration, result.best_metrics)


# --------------------------------------------------------------------------- the score world


def edit_interactions(store: Store, no_features: str) -> None:
    """COLD users keep only test rows; GHOST watched only ``no_features``."""
    table = store.table("interactions").read()
    cold = pc.is_in(table["user_id"], pa.array(COLD))
    split = pc.if_else(cold, pa.scalar("test"), table["split"])
    table = table.set_column(table.schema.get_field_index("split"), "split", split)
    ghost = table.slice(0, 1).to_pylist()[0] | {
        "user_id": GHOST, "video_id": no_features, "split": "train",
        "source_row": int(pc.max(table["source_row"]).as_py()) + 1}
    table = pa.concat_tables([table, pa.Table.from_pylist([ghost], schema=table.schema)])
    store.table("interactions").write(table)


def score_reference(world: tuple) -> tuple[dict, set, list[str], list[str]]:
    """Every (user, video) score by the model's forward pass, and the training pairs.

    Returns (scores {(user, video): logit}, seen {(user, video)}, users, videos), sorted ids;
    the forward runs on the merged shards, in the graph's local spaces.
    """
    cfg, store, _, _ = world
    saved = torch.load(store.path(run_path(SCORE_RUN, "model.pt")), weights_only=True)
    model = FRAME(**saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    shard, manifest = load_shards(store, cfg.graph.n_clips, [0, 1])
    features = load_clip_features(store, manifest, shard.video_ids)
    data = WorkerData.from_shard(shard, cfg.graph.n_clips, manifest.n_train, features)
    m, n = shard.n_users, len(shard.video_ids)
    users = torch.arange(m).repeat_interleave(n)
    videos = torch.arange(n).repeat(m)
    with torch.no_grad():
        logits = model.score_pairs(data.clip_features, data.graph, users, videos).view(m, n)
    user_ids = shard.user_ids.to_pylist()  # the shards' own id column
    assert user_ids == [read_graph_user_ids(store, manifest)[u].as_py() for u in shard.user_rows]
    video_ids = [manifest.video_ids[v] for v in shard.video_ids]
    scores = {(user_ids[i], video_ids[j]): float(logits[i, j]) for i in range(m)
              for j in range(n)}
    seen = {(user_ids[u], video_ids[v]) for u, v in zip(shard.train["user"],
                                                        shard.train["video"])}
    return scores, seen, sorted(user_ids), sorted(video_ids)


def fresh_copy(world: tuple, tmp_path: Path, *extra: str) -> World:
    """A copy of the score world's store without a scores table, and its config."""
    _, store, overrides, _ = world
    return copy_store(store, overrides, tmp_path / "store", *extra, ignore=(SCORES_TABLE,))


def top_k_lists(table: pa.Table) -> dict[str, list[tuple[str, float]]]:
    """user -> [(video, score)] in rank order; checks ranks are 1..n."""
    out: dict[str, list[tuple[str, float]]] = {}
    rows = table.sort_by([("user_id", "ascending"), ("rank", "ascending")]).to_pylist()
    for r in rows:
        out.setdefault(r["user_id"], []).append((r["video_id"], r["score"]))
        assert r["rank"] == len(out[r["user_id"]])
    return out


def naive_top_k(reference: tuple, k: int, exclude_seen: bool,
                candidates: set[str] | None = None) -> dict[str, list[tuple[str, float]]]:
    """Top ``k`` of every user from ``reference`` = (scores, seen, users, videos)."""
    scores, seen, users, videos = reference
    out = {}
    for u in users:  # the reference: every pair's forward score, sorted per user
        pairs = [(v, scores[(u, v)]) for v in videos
                 if (candidates is None or v in candidates)
                 and not (exclude_seen and (u, v) in seen)]
        out[u] = sorted(pairs, key=lambda p: -p[1])[:k]
    return out


def assert_same_lists(got: dict, expected: dict) -> None:
    """Same lists; a user with no candidate left has no row at all."""
    assert sorted(got) == sorted(u for u, lst in expected.items() if lst)
    expected = {u: lst for u, lst in expected.items() if lst}
    for user, exp in expected.items():
        g = got[user]
        assert len(g) == len(exp), user
        np.testing.assert_allclose([s for _, s in g], [s for _, s in exp], atol=TOL, rtol=0)
        for (gv, gs), (ev, es) in zip(g, exp):
            # same video, unless two videos tie within the tolerance
            assert gv == ev or abs(gs - es) <= TOL, (user, g, exp)
