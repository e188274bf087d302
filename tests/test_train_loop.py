"""Ray Train + DeepSpeed training against a real local Ray instance.

The store holds a tiny synthetic world (real ingest) whose frame features are written directly
(one fixed random vector per visual topic plus noise, at the world's true scene timeline), so
training has something to learn without spending the test's time in the ResNet trunk.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from feature_store.frames import commit_frame_parts, frame_features_table, write_frame_part
from feature_store.store import Store, StoreError
from frame_dist.config import ConfigError, load_config
from frame_dist.graph.shards import (
    PartitionError,
    build_shards,
    check_graph,
    load_clip_features,
    load_shards,
)
from frame_dist.train.ray_loop import check_trainable, run_training
from frame_dist.train.trainer import EvalData, TrainData, build_model, train
from frame_dist.train.worker_data import WorkerData
from jobs import ingest as ingest_job

pytestmark = pytest.mark.slow
GRID = 8
BASE = ["world.preset=custom", "world.n_users=24", "world.n_videos=10",
        "world.interactions_per_user=12", "world.min_duration_s=1", "world.max_duration_s=2",
        f"extract.grid_size={GRID}", "graph.n_clips=4", "graph.n_shards=2",
        "model.dim=16", "model.hidden=32", "train.batch_size=64", "train.epochs=3",
        "train.patience=10", "train.seed=7"]


def _write_topic_features(store: Store, skip: str | None = None) -> None:
    """Frame features of every video but ``skip``: topic vector x 3 + 5 + noise per grid frame."""
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
    commit_frame_parts(store, [part], {"weights": "test-topics", "grid_size": GRID,
                                       "dim": 2048, "image_size": 0})


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    overrides = [*BASE, f"store.root={root}/store", f"world.out_dir={root}/world"]
    assert ingest_job.main(overrides) == 0
    cfg = load_config(None, overrides)
    store = Store.from_config(cfg.store)
    _write_topic_features(store)
    build_shards(cfg, store)
    return cfg, store, overrides


def _single_process(cfg, store):
    """The plain-torch trainer on the merged shards, batches in the global training order."""
    shard, manifest = load_shards(store, cfg.graph.n_clips, [0, 1])
    features = load_clip_features(store, manifest, shard.video_ids)
    data = WorkerData.from_shard(shard, cfg.graph.n_clips, manifest["n_train"], features)
    order = np.argsort(shard.train["order"])
    t, v = shard.train, shard.valid
    table = None
    if cfg.model.trainable_clip_features:
        table = torch.from_numpy(load_clip_features(store, manifest,
                                                    np.arange(manifest["n_videos"])))
    model = build_model(cfg.model, features.shape[1], seed=cfg.train.seed, clip_features=table,
                        n_clips_total=manifest["n_videos"] * cfg.graph.n_clips)
    result = train(model, data.clip_features, data.graph,
                   TrainData(t["user"][order], t["video"][order], t["watched"][order]),
                   EvalData(v["user"], v["video"], v["label"].astype(np.int64)), cfg.train)
    return result


def _train_and_save(cfg, store, global_step: int = 0) -> None:
    """:func:`_single_process`, saved with the training stage's writer (model.pt, metrics.json)."""
    from frame_dist.train.ray_loop import write_outputs

    result = _single_process(cfg, store)
    model = build_model(cfg.model, 2048, seed=cfg.train.seed)
    model.load_state_dict(result.best_state)
    state = {"history": result.history, "best_epoch": result.best_epoch,
             "global_step": global_step, "resumes": []}
    write_outputs(cfg, store, model, state, {}, "test-fingerprint")


def _run(overrides, **extra):
    cfg = load_config(None, [*overrides, *[f"{k}={v}" for k, v in extra.items()]])
    return cfg, run_training(cfg, Store.from_config(cfg.store))


def _weights(store, run_name):
    return torch.load(store.path(f"runs/{run_name}/model.pt").replace("file://", ""),
                      weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def two_worker_run(ray_local, store_cfg):
    """An uninterrupted W = 2 run, shared by the parity and the fault test."""
    return _run(store_cfg[2], **{"train.workers": 2, "train.run_name": "w2"})[1]


def test_parity_one_two_workers_and_single_process(ray_local, store_cfg, two_worker_run,
                                                   monkeypatch):
    cfg, store, overrides = store_cfg
    # W = 1 names the store relative to the driver's working directory, as configs/demo.yaml
    # does: Ray Train workers run elsewhere and must still find it
    monkeypatch.chdir(os.path.dirname(store.root))
    _, m1 = _run(overrides, **{"train.workers": 1, "train.run_name": "w1",
                               "store.root": os.path.basename(store.root)})
    m2 = two_worker_run
    single = _single_process(cfg, store)

    assert m1["epochs_run"] == m2["epochs_run"] == 3
    for e1, e2, es in zip(m1["history"], m2["history"], single.history):
        assert e1["loss"] == pytest.approx(es["loss"], abs=1e-5)
        assert e2["loss"] == pytest.approx(es["loss"], abs=1e-5)
        assert e2["valid"]["auc"] == pytest.approx(es["valid"]["auc"], abs=1e-5)
    w1, w2 = _weights(store, "w1"), _weights(store, "w2")
    for name, expected in single.best_state.items():
        torch.testing.assert_close(w1[name], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w2[name], expected, atol=1e-5, rtol=1e-5)
    assert m2["test"]["auc"] == pytest.approx(m1["test"]["auc"], abs=1e-5)
    assert m2["history"][0]["propagation_bytes_per_step"] > 0  # the all-reduce really ran

    # ZeRO stage 2 (optimizer state and gradients partitioned over the workers): same weights
    _run(overrides, **{"train.workers": 2, "train.run_name": "w2-zero2", "train.zero_stage": 2})
    for name, value in _weights(store, "w2-zero2").items():
        torch.testing.assert_close(value, single.best_state[name], atol=1e-5, rtol=1e-5)


def test_trainable_clip_features_zero2_equal_single_process(ray_local, store_cfg):
    """Learned clip features on W = 2 with ZeRO-2: the whole (C, F) table on every worker, its
    Adam state split between them, and the same weights as one process."""
    cfg, store, overrides = store_cfg
    extra = {"model.trainable_clip_features": "true", "train.epochs": 2}
    run_cfg, m2 = _run(overrides, **extra, **{"train.workers": 2, "train.zero_stage": 2,
                                               "train.run_name": "table-zero2"})
    single = _single_process(run_cfg, store)
    weights = _weights(store, "table-zero2")
    c_total = store.read_json("graphs/nc=4/_manifest.json")["n_videos"] * 4
    assert weights["clip_feature_table.weight"].shape == (c_total, 2048)
    for name, expected in single.best_state.items():
        torch.testing.assert_close(weights[name], expected, atol=1e-5, rtol=1e-5)
    start = load_clip_features(store, store.read_json("graphs/nc=4/_manifest.json"),
                               np.arange(c_total // 4))
    moved = (weights["clip_feature_table.weight"] - torch.from_numpy(start)).abs().amax(1)
    assert (moved > 1e-4).sum() > 0  # the features were learned
    # Adam moments of all parameters take 2 x 4 B each, the table most of it; each
    # ZeRO-2 worker holds its half (the split is by flat parameter range)
    n_params = sum(v.numel() for v in weights.values())
    assert weights["clip_feature_table.weight"].numel() > 0.6 * n_params
    per_worker = m2["history"][0]["optimizer_state_bytes"]
    assert 0.45 * 8 * n_params <= per_worker <= 0.55 * 8 * n_params + 64
    # the evaluate stage rebuilds the model, table included, from model.pt alone
    from frame_dist.evaluate.evaluation import evaluate_run, load_test_split

    test = load_test_split(store, "table-zero2")
    assert test.data.clip_features is None  # the model owns its table: no (C, F) read
    result = evaluate_run(run_cfg, store, test)
    assert result["model"]["auc"] == pytest.approx(m2["test"]["auc"], abs=1e-5)


def test_killed_worker_resumes_from_checkpoint(ray_local, store_cfg, two_worker_run):
    from ray._private import state as ray_state

    cfg, store, overrides = store_cfg
    name = "fault"
    runs = store.path("runs", name)
    killed: list[int] = []

    def registered_checkpoint() -> bool:
        # a checkpoint folder appears while it uploads; Ray Train restores only the ones its
        # controller registered, which it records in this snapshot
        snapshot = os.path.join(runs, "checkpoint_manager_snapshot.json")
        return os.path.exists(snapshot) and "checkpoint_" in open(snapshot).read()

    def kill_one_worker_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if registered_checkpoint():
                for actor in ray_state.actors().values():
                    if (actor["ActorClassName"].endswith("RayTrainWorker")
                            and actor["State"] == "ALIVE"):
                        os.kill(actor["Pid"], signal.SIGKILL)
                        killed.append(actor["Pid"])
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, daemon=True)
    killer.start()
    _, metrics = _run(overrides, **{"train.workers": 2, "train.run_name": name,
                                    "train.checkpoint_every_steps": 2})
    killer.join(timeout=5)
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    assert metrics["resumed_at_steps"] and metrics["resumed_at_steps"][0] > 0
    steps = metrics["global_step"]
    assert steps == 3 * -(-store.read_json("graphs/nc=4/_manifest.json")["n_train"] // 64)
    # exact resume: the same weights as an uninterrupted run with the same settings
    assert metrics["test"]["auc"] == pytest.approx(two_worker_run["test"]["auc"], abs=1e-5)
    for key, value in _weights(store, "w2").items():
        torch.testing.assert_close(_weights(store, name)[key], value, atol=1e-5, rtol=1e-5)

    # launching the finished run again resumes it (no training from scratch)
    _, again = _run(overrides, **{"train.workers": 2, "train.run_name": name,
                                  "train.checkpoint_every_steps": 2})
    assert again["global_step"] == steps
    assert again["resumed_at_steps"][-1] == steps
    # ... but not with other settings: refused before any worker starts
    with pytest.raises(ConfigError, match="was started with another graph or other model/train"):
        _run(overrides, **{"train.workers": 2, "train.run_name": name, "train.lr": 0.01})


def test_graph_user_ids_live_in_parquet_not_the_manifest(store_cfg, tmp_path):
    """Every worker reads the manifest: it lists no user id. The user id map and each shard's
    users' ids are Parquet columns; a graph of the older layout is refused, then rebuilt."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc

    from frame_dist.graph.shards import graph_dir, read_graph_manifest, read_graph_user_ids

    cfg, store, _ = store_cfg
    manifest = read_graph_manifest(store, 4)
    assert "user_ids" not in manifest and manifest["layout"] == 2
    ids = read_graph_user_ids(store, manifest)
    interactions = store.table("interactions").read()
    assert ids.to_pylist() == sorted(set(interactions["user_id"].to_pylist()))  # sorted map
    for k in range(manifest["n_shards"]):
        shard, _ = load_shards(store, 4, [k])
        assert shard.user_ids.equals(pc.take(ids, pa.array(shard.user_rows)))

    root = tmp_path / "old"
    shutil.copytree(store.path(), root)
    old = Store(str(root))
    path = root / graph_dir(4) / "_manifest.json"
    legacy = {k: v for k, v in manifest.items() if k != "layout"}
    path.write_text(json.dumps(legacy | {"fingerprint": "older", "user_ids": ids.to_pylist()}))
    with pytest.raises(PartitionError, match="built by an older frame-dist .* run the graph "
                                             "stage again"):
        load_shards(old, 4, [0])
    rebuilt = build_shards(load_config(None, [*store_cfg[2], f"store.root={root}"]), old)
    assert not rebuilt.get("skipped") and rebuilt["layout"] == 2
    assert load_shards(old, 4, [0])[0].user_ids.equals(load_shards(store, 4, [0])[0].user_ids)


def test_refused_before_training(store_cfg, tmp_path):
    cfg, store, overrides = store_cfg
    with pytest.raises(PartitionError, match=r"train.workers=3 exceeds the 2 shard\(s\)"):
        check_graph(store, 4, 3)
    with pytest.raises(PartitionError, match="no committed graph for N_c=2"):
        check_trainable(load_config(None, [*overrides, "graph.n_clips=2"]), store)
    with pytest.raises(ConfigError, match="graph.n_clips=3 must divide extract.grid_size=8"):
        load_config(None, [*overrides, "graph.n_clips=3"])
    with pytest.raises(ConfigError, match="train.workers=3 exceeds graph.n_shards=2"):
        load_config(None, [*overrides, "train.workers=3"])
    # a shard file lost after the commit
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.path(), copy)
    manifest = Store(str(copy)).read_json("graphs/nc=4/_manifest.json")
    os.remove(copy / "graphs/nc=4" / manifest["files"][1]["neg"])
    with pytest.raises(StoreError, match="graph shard 1 is missing its neg file"):
        check_graph(Store(str(copy)), 4, 2)


def test_evaluate_stage_matches_training_and_reports_oracle(store_cfg, two_worker_run):
    from frame_dist.evaluate.evaluation import evaluate_run, metrics_table

    cfg, store, overrides = store_cfg
    result = evaluate_run(load_config(None, [*overrides, "train.run_name=w2"]), store)
    for key, value in two_worker_run["test"].items():  # rebuilt from model.pt alone
        assert result["model"][key] == pytest.approx(value, abs=1e-5), key
    oracle = result["oracle"]
    assert oracle["n"] == result["model"]["n"] > 0
    assert 0.5 < oracle["auc"] <= 1.0
    table = metrics_table(result)
    assert table.splitlines()[2].startswith("| model | ")
    assert table.splitlines()[3].startswith("| oracle | ")
    assert store.read_json("runs/w2/evaluation.json") == result


def test_plan_estimate_matches_measured_peak_rss(store_cfg, two_worker_run):
    """The planner's per-worker peak (frame_dist.train.plan) against what the W = 2 run measured.

    Memory: within 0.5x-2x of the largest worker's peak RSS, the accuracy docs/training.md
    states (an upper-bound style estimate of RSS, which allocators make imprecise); on this tiny
    world the runtime baseline is almost all of it. Bytes per step: the expectation over random
    batches against the mean of the run's 3 epochs, within 5%.
    """
    from frame_dist.graph.shards import read_graph_manifest
    from frame_dist.train.plan import MIB, plan_training, read_data_stats, worker_budget

    cfg, store, overrides = store_cfg
    run_cfg = load_config(None, [*overrides, "train.workers=2", "train.run_name=w2"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_training(read_data_stats(store, run_cfg), run_cfg, worker_budget(run_cfg),
                         device, read_graph_manifest(store, run_cfg.graph.n_clips))
    history = two_worker_run["history"]
    measured = max(max(epoch["peak_rss_mb"]) for epoch in history) * MIB
    ratio = plan.total("host") / measured
    assert 0.5 <= ratio <= 2.0, (ratio, plan.table())
    sent = np.mean([epoch["propagation_bytes_per_step"] for epoch in history])
    assert plan.comm_bytes_per_step == pytest.approx(sent, rel=0.05)
    print(f"plan / measured: memory {ratio:.3f}, bytes {plan.comm_bytes_per_step / sent:.3f}")
