"""Ray Train + DeepSpeed training against a real local Ray instance.

The store is a copy of the session's ``tiny_world`` (tests/conftest.py, tests/worlds.py): a tiny
synthetic world (real ingest) whose frame features are written directly (one fixed random vector
per visual topic plus noise, at the world's true scene timeline), so training has something to
learn without spending the test's time in the ResNet trunk, and its graph (N_c = 4, 2 shards).
The tests that run Ray Train are marked ``slow``; the graph checks need no Ray.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from worlds import copy_store, single_process_training  # tests/ is on sys.path (pytest)

from feature_store.store import Store, StoreError
from frame_dist.config import ConfigError, load_config
from frame_dist.graph.shards import (
    PartitionError,
    build_shards,
    check_graph,
    load_clip_features,
    load_shards,
    read_graph_manifest,
)
from frame_dist.train.artifacts import run_dir, run_path
from frame_dist.train.ray_loop import check_trainable, run_training


@pytest.fixture(scope="module")
def store_cfg(tiny_world, tmp_path_factory):
    _, store, overrides = tiny_world
    return copy_store(store, overrides, tmp_path_factory.mktemp("train") / "store")


def _run(overrides, **extra):
    cfg = load_config(None, [*overrides, *[f"{k}={v}" for k, v in extra.items()]])
    return cfg, run_training(cfg, Store.from_config(cfg.store))


def _weights(store, run_name):
    return torch.load(store.path(run_path(run_name, "model.pt")).replace("file://", ""),
                      weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def two_worker_run(ray_local, store_cfg):
    """An uninterrupted W = 2 run, shared by the parity and the fault test."""
    return _run(store_cfg[2], **{"train.workers": 2, "train.run_name": "w2"})[1]


@pytest.mark.slow
def test_parity_one_two_workers_and_single_process(ray_local, store_cfg, two_worker_run,
                                                   monkeypatch):
    cfg, store, overrides = store_cfg
    # W = 1 names the store relative to the driver's working directory, as configs/demo.yaml
    # does: Ray Train workers run elsewhere and must still find it
    monkeypatch.chdir(os.path.dirname(store.root))
    _, m1 = _run(overrides, **{"train.workers": 1, "train.run_name": "w1",
                               "store.root": os.path.basename(store.root)})
    m2 = two_worker_run
    single = single_process_training(cfg, store)

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


@pytest.mark.slow
def test_trainable_clip_features_zero2_equal_single_process(ray_local, store_cfg):
    """Learned clip features on W = 2 with ZeRO-2: the whole (C, F) table on every worker, its
    Adam state split between them, and the same weights as one process."""
    cfg, store, overrides = store_cfg
    extra = {"model.trainable_clip_features": "true", "train.epochs": 2}
    run_cfg, m2 = _run(overrides, **extra, **{"train.workers": 2, "train.zero_stage": 2,
                                               "train.run_name": "table-zero2"})
    single = single_process_training(run_cfg, store)
    weights = _weights(store, "table-zero2")
    c_total = read_graph_manifest(store, 4).n_videos * 4
    assert weights["clip_feature_table.weight"].shape == (c_total, 2048)
    for name, expected in single.best_state.items():
        # Adam divides by sqrt(v): after 2 epochs an entry whose gradients stay near 0 can move
        # by rounding (ZeRO-2's reduction order); all but a handful of entries agree to 1e-5
        off = (weights[name] - expected).abs()
        assert float(off.max()) < 1e-4 and int((off > 1e-5).sum()) <= 4, (name, off.max())
    start = load_clip_features(store, read_graph_manifest(store, 4), np.arange(c_total // 4))
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


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(ray_local, store_cfg, two_worker_run):
    from ray._private import state as ray_state

    cfg, store, overrides = store_cfg
    name = "fault"
    runs = store.path(run_dir(name))
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
    assert steps == 3 * -(-read_graph_manifest(store, 4).n_train // 64)
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

    from frame_dist.graph.manifest import manifest_path
    from frame_dist.graph.shards import graph_dir, read_graph_user_ids

    cfg, store, _ = store_cfg
    manifest = read_graph_manifest(store, 4)
    assert '"user_ids"' not in store.read_bytes(manifest_path(4)).decode()
    assert manifest.layout == 2
    ids = read_graph_user_ids(store, manifest)
    interactions = store.table("interactions").read()
    assert ids.to_pylist() == sorted(set(interactions["user_id"].to_pylist()))  # sorted map
    for k in range(manifest.n_shards):
        shard, _ = load_shards(store, 4, [k])
        assert shard.user_ids.equals(pc.take(ids, pa.array(shard.user_rows)))

    root = tmp_path / "old"
    shutil.copytree(store.path(), root)
    old = Store(str(root))
    path = root / graph_dir(4) / "_manifest.json"
    legacy = {k: v for k, v in manifest.to_json().items() if k != "layout"}
    path.write_text(json.dumps(legacy | {"fingerprint": "older", "user_ids": ids.to_pylist()}))
    with pytest.raises(PartitionError, match="built by an older frame-dist .* run the graph "
                                             "stage again"):
        load_shards(old, 4, [0])
    rebuilt = build_shards(load_config(None, [*store_cfg[2], f"store.root={root}"]), old)
    assert not rebuilt.skipped and rebuilt.manifest.layout == 2
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
    manifest = read_graph_manifest(Store(str(copy)), 4)
    os.remove(copy / "graphs/nc=4" / manifest.files[1]["neg"])
    with pytest.raises(StoreError, match="graph shard 1 is missing its neg file"):
        check_graph(Store(str(copy)), 4, 2)


def test_validation_split_that_cannot_rank_is_refused_at_the_driver(store_cfg, tmp_path):
    """Before any worker starts (no Ray here): the driver counts the committed graph's
    validation labels; an empty or one-class split is refused with its counts, unclaimed."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from frame_dist.graph.shards import graph_dir, split_label_counts
    from frame_dist.train.loop import SplitError

    cfg, store, overrides = store_cfg
    manifest = read_graph_manifest(store, 4)
    rows, positives = split_label_counts(store, manifest, "valid")
    labels = load_shards(store, 4, [0, 1])[0].valid["label"]
    assert (rows, positives) == (len(labels), int(labels.sum())) and 0 < positives < rows
    cases = {"skips-only": rf"split 'valid' has {rows} row\(s\), 0 full watch\(es\) and "
                           rf"{rows} skip\(s\)",
             "empty": r"split 'valid' has 0 row\(s\), 0 full watch\(es\)"}
    for case, message in cases.items():
        root = tmp_path / case
        shutil.copytree(store.path(), root)
        for names in manifest.files:
            path = root / graph_dir(4) / names["valid"]
            table = pq.read_table(path)
            table = table.slice(0, 0) if case == "empty" else table.set_column(
                table.schema.get_field_index("label"), "label",
                pa.array(np.zeros(table.num_rows, np.int8)))
            pq.write_table(table, path)
        run_cfg = load_config(None, [*overrides, f"store.root={root}", "train.run_name=bad"])
        with pytest.raises(SplitError, match=message):
            run_training(run_cfg, Store(str(root)))
        assert not Store(str(root)).exists(run_dir("bad"))  # refused before the claim


@pytest.mark.slow
def test_both_trainers_record_the_same_history_and_stop_alike(ray_local, store_cfg):
    """One loop (frame_dist.train.loop.fit) on both paths: the same history keys, and with
    weights that barely move (lr 1e-12) both stop after train.patience epochs past the best."""
    cfg, store, overrides = store_cfg
    settings = {"train.lr": 1e-12, "train.patience": 1, "train.epochs": 5}
    run_cfg, metrics = _run(overrides, **settings, **{"train.workers": 1,
                                                      "train.run_name": "stop"})
    single = single_process_training(run_cfg, store)
    assert single.stopped_early
    assert metrics["epochs_run"] == len(single.history) < 5
    assert metrics["best_epoch"] == single.best_epoch
    assert [set(e) for e in metrics["history"]] == [set(e) for e in single.history]
    for e, es in zip(metrics["history"], single.history):
        assert e["valid"]["auc"] == pytest.approx(es["valid"]["auc"], abs=1e-5)


@pytest.mark.slow
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
    assert store.read_json(run_path("w2", "evaluation.json")) == result


@pytest.mark.slow
def test_bf16_run_scores_metrics_in_fp32_and_stores_its_calibration(ray_local, store_cfg):
    """train.precision=bf16 on the CPU workers: the test metrics in metrics.json equal the
    evaluate stage's (fp32 logits on both paths, the same stored calibration) to 1e-6."""
    from frame_dist.evaluate.evaluation import evaluate_run

    cfg, store, overrides = store_cfg
    run_cfg, metrics = _run(overrides, **{"train.workers": 2, "train.precision": "bf16",
                                          "train.epochs": 2, "train.run_name": "bf16"})
    saved = torch.load(store.path(run_path("bf16", "model.pt")), weights_only=True)
    assert saved["calibration"] == metrics["calibration"] != {"a": 1.0, "b": 0.0}
    assert metrics["valid"]["logloss"] <= metrics["valid"]["logloss_raw"]
    result = evaluate_run(run_cfg, store)
    assert result["calibration"] == metrics["calibration"]
    assert metrics["test"].keys() == result["model"].keys()
    for key, value in metrics["test"].items():
        assert result["model"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_plan_estimate_matches_measured_peak_rss(store_cfg, two_worker_run):
    """The planner's per-worker peak (frame_dist.train.plan) against what the W = 2 run measured.

    Memory: within 0.5x-2x of the largest worker's peak RSS, the accuracy docs/training.md
    states (an upper-bound style estimate of RSS, which allocators make imprecise); on this tiny
    world the runtime baseline is almost all of it. Bytes per step: the expectation over random
    batches against the mean of the run's 3 epochs, within 5%.
    """
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


@pytest.mark.slow
def test_a_planted_deepspeed_state_is_refused_on_resume_and_never_runs(ray_local, store_cfg,
                                                                        tmp_path):
    import glob

    from payloads import plant

    cfg, store, overrides = store_cfg
    extra = {"train.workers": 1, "train.run_name": "planted", "train.epochs": 1,
             "train.max_failures": 0}
    _run(overrides, **extra)
    states = glob.glob(os.path.join(store.path(run_dir("planted")), "checkpoint_*", "state",
                                    "mp_rank_00_model_states.pt"))
    assert states
    marker = tmp_path / "pwned"
    for path in states:  # someone with write access to the store plants a pickle
        plant(path, str(marker))
    with pytest.raises(Exception) as err:  # noqa: B017 - Ray Train wraps the worker's error
        _run(overrides, **extra)  # a relaunch resumes from the latest checkpoint
    assert "mp_rank_00_model_states.pt: refused to load" in str(err.value)
    assert not marker.exists()
