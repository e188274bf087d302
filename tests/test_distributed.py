"""Exact data-parallel propagation: W = 2 gloo processes equal one process (no Ray here).

A random interaction set is partitioned into 2 user shards in their local clip spaces, exactly
as the graph stage does; each process computes the loss of its share of one global batch with
DistributedPropagation; the summed gradients must equal the single-process gradients of the
whole batch within 1e-5, and so must the loss. Under bf16 autocast (``train.precision``) the
two agree within bf16's rounding.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from frame_dist.graph.clip_graph import adjacency, build_graph, clip_labels
from frame_dist.graph.shards import Shard, partition_users
from frame_dist.model.clip_inputs import FrozenClipInputs, streamed_user_sums
from frame_dist.model.distributed import OwnedClipInputs, owned_videos, videos_of_any_worker
from frame_dist.model.frame import FRAME
from frame_dist.model.loss import FRAMETrainTask, HybridLoss, InteractionBatch
from frame_dist.model.propagation import PropagationGraph, clip_ids
from frame_dist.train.trainer import autocast_for
from frame_dist.train.worker_data import WorkerData

N_USERS, N_VIDEOS, N_C, F, DIM = 30, 12, 4, 16, 8


def _world():
    rng = np.random.default_rng(3)
    n = 240
    users = rng.integers(0, N_USERS, n)
    videos = rng.integers(0, N_VIDEOS, n)
    ratio = rng.uniform(0, 1.0, n)
    full = rng.uniform(size=n) < 0.35
    ratio[full] = 1.0
    features = rng.normal(size=(N_VIDEOS * N_C, F)).astype(np.float32)
    return users, videos, ratio, full, features


def _shards(users, videos, ratio, full, n_shards):
    graph = build_graph(users, videos, ratio, full, n_users=N_USERS, n_videos=N_VIDEOS,
                        n_clips=N_C)
    watched = clip_labels(ratio, full, N_C)
    weights = np.diff(graph.pos_norm.indptr) + np.diff(graph.neg_norm.indptr)
    shard_of = partition_users(weights, n_shards)
    out = []
    for k in range(n_shards):
        rows = np.flatnonzero(shard_of == k)
        mine = np.isin(users, rows)
        vids = np.unique(videos[mine])
        cols = clip_ids(vids, N_C)
        local_u = np.searchsorted(rows, users[mine])
        local_v = np.searchsorted(vids, videos[mine])
        train = {"user": local_u, "video": local_v, "watched": watched[mine],
                 "label": full[mine].astype(np.int8), "order": np.flatnonzero(mine)}
        empty = {key: np.zeros(0, np.int64) for key in train}
        out.append(Shard(k, rows, vids, graph.pos_norm[rows][:, cols].tocsr(),
                         graph.neg_norm[rows][:, cols].tocsr(), train, empty, empty))
    return graph, watched, out


MODES = {"visual": {}, "free clip table": {"use_visual": False},
         "trainable clip features": {"trainable_clip_features": True},
         "precomputed R~X": {},  # visual, each worker's R~ X precomputed (FrozenClipInputs)
         "owned features": {}}  # and the features partitioned by owner (OwnedClipInputs)
FROZEN = ("precomputed R~X", "owned features")


def _model(mode, features, seed=0, propagation=None):
    """FRAME with the clip input of ``mode``: the features, a free table, or learned features."""
    torch.manual_seed(seed)
    model = FRAME(F, dim=DIM, hidden=16, n_clips_total=N_VIDEOS * N_C, propagation=propagation,
                  **MODES[mode])
    if model.trainable_clip_features:
        model.init_clip_features(torch.from_numpy(features))
    return model


def _single_process(batch_positions, mode, precision="fp32"):
    users, videos, ratio, full, features = _world()
    graph, watched, _ = _shards(users, videos, ratio, full, 1)
    pg = PropagationGraph(adjacency(graph.pos_norm), adjacency(graph.neg_norm), N_C)
    model = _model(mode, features)
    visual = mode in ("visual", *FROZEN)  # the reference: the features themselves
    task = FRAMETrainTask(model, HybridLoss(1.0, 1.0, 1e-4),
                          torch.from_numpy(features) if visual else None, pg)
    idx = torch.as_tensor(batch_positions)
    with autocast_for("cpu", precision):
        loss, _ = task(InteractionBatch(torch.as_tensor(users)[idx],
                                        torch.as_tensor(videos)[idx],
                                        torch.as_tensor(watched)[idx]))
    loss.backward()
    with torch.no_grad():  # every pair's score, at once
        scores = model.score_pairs(task.clip_features, pg, torch.as_tensor(users)[idx],
                                   torch.as_tensor(videos)[idx])
    return (float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters()},
            scores)


def _worker(rank, world, batch_positions, out_dir, mode, precision):
    # a file rendezvous: no port picked in advance that another process could take meanwhile
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                            world_size=world)
    try:
        from frame_dist.model.distributed import DistributedPropagation

        users, videos, ratio, full, features = _world()
        _, _, shards = _shards(users, videos, ratio, full, world)
        shard = shards[rank]
        cols = clip_ids(shard.video_ids, N_C)
        data = WorkerData.from_shard(shard, N_C, len(users), None if MODES[mode] else
                                     features[cols])
        if mode == "precomputed R~X":
            data.clip_features = FrozenClipInputs.build(data.clip_features, data.graph)
        prop = DistributedPropagation(data.global_clip_ids, dist.new_group(backend="gloo"))
        if mode == "owned features":  # my owned clips' rows; R~ X from 3 videos at a time
            present = videos_of_any_worker(N_VIDEOS, shard.video_ids, prop.group)
            owned = clip_ids(owned_videos(N_VIDEOS, rank, world, present), N_C)
            blocks = ((torch.arange(k * N_C, min(k + 3, len(shard.video_ids)) * N_C),
                       torch.from_numpy(features[cols[k * N_C:(k + 3) * N_C]]))
                      for k in range(0, len(shard.video_ids), 3))
            data.clip_features = OwnedClipInputs(torch.from_numpy(owned),
                                                 torch.from_numpy(features[owned]),
                                                 *streamed_user_sums(data.graph, blocks, F), prop)
        model = _model(mode, features, propagation=prop)
        task = FRAMETrainTask(model, HybridLoss(1.0, 1.0, 1e-4), data.clip_features,
                              data.graph)
        batch = data.local_batch(np.asarray(batch_positions), len(batch_positions), world,
                                 "cpu")
        with autocast_for("cpu", precision):
            loss, _ = task(batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        for g in grads.values():  # what DeepSpeed does: average over the workers
            dist.all_reduce(g)
            g /= world
        total = loss.detach().clone()
        dist.all_reduce(total)
        local = [0] * world
        dist.all_gather_object(local, len(batch))
        step_bytes = prop.bytes_sent
        with torch.no_grad():  # 5 pairs at a time: each worker its own pairs, as many chunks
            scores = model.score_pairs(data.clip_features, data.graph, batch.users,
                                       batch.videos, batch_size=5)
        every = [None] * world
        dist.all_gather_object(every, scores)
        if rank == 0:
            torch.save({"loss": float(total) / world, "grads": grads,
                        "bytes": step_bytes, "local": local, "scores": every},
                       os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def _members_of_two_shards(world):
    """Positions of a batch whose users all live in shards 0 and 1: shard 2's part is empty
    (its worker still joins every collective)."""
    users, videos, ratio, full, _ = _world()
    _, _, shards = _shards(users, videos, ratio, full, world)
    return np.flatnonzero(np.isin(users, np.concatenate([shards[0].user_rows,
                                                          shards[1].user_rows])))[::2]


@pytest.mark.parametrize("batch,mode,precision,world", [
    (np.arange(0, 240, 3), "visual", "fp32", 2),  # the fast lane's one (~3 s per spawn of 2)
    (np.arange(0, 240, 3), "precomputed R~X", "fp32", 2),
    pytest.param(np.arange(240), "visual", "fp32", 2, marks=pytest.mark.slow),
    pytest.param(np.arange(0, 240, 2), "precomputed R~X", "fp32", 3, marks=pytest.mark.slow),
    pytest.param(_members_of_two_shards(3), "precomputed R~X", "fp32", 3,
                 marks=pytest.mark.slow),
    pytest.param(np.arange(0, 240, 3), "precomputed R~X", "bf16", 2, marks=pytest.mark.slow),
    (np.arange(0, 240, 3), "owned features", "fp32", 2),
    pytest.param(np.arange(0, 240, 2), "owned features", "fp32", 3, marks=pytest.mark.slow),
    pytest.param(_members_of_two_shards(3), "owned features", "fp32", 3,
                 marks=pytest.mark.slow),
    pytest.param(np.arange(0, 240, 3), "owned features", "bf16", 2, marks=pytest.mark.slow),
    pytest.param(np.arange(0, 240, 2), "free clip table", "fp32", 2, marks=pytest.mark.slow),
    pytest.param(np.arange(0, 240, 2), "trainable clip features", "fp32", 2,
                 marks=pytest.mark.slow),
    # the all-reduced partial sums stay fp32
    pytest.param(np.arange(0, 240, 3), "visual", "bf16", 2, marks=pytest.mark.slow),
])
def test_workers_equal_one_process(tmp_path, batch, mode, precision, world):
    expected_loss, expected_grads, expected_scores = _single_process(batch, mode, precision)
    mp.spawn(_worker, args=(world, batch.tolist(), str(tmp_path), mode, precision),
             nprocs=world)
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    tol = 1e-5 if precision == "fp32" else 2e-2  # bf16: 8 mantissa bits, sums in another order
    assert got["loss"] == pytest.approx(expected_loss, abs=tol, rel=tol)
    assert sum(got["local"]) == len(batch)  # each worker saw only its part of the batch
    assert max(got["local"]) < len(batch)
    users, videos, ratio, full, _ = _world()
    shards = _shards(users, videos, ratio, full, world)[2]
    assert got["local"] == [int(np.isin(users[batch], s.user_rows).sum()) for s in shards]
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got["grads"][name], grad, atol=tol, rtol=tol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # scoring in chunks of 5 pairs (fp32), each worker its own: the single process's scores
    for shard, scores in zip(shards, got["scores"]):
        mine = np.isin(users[batch], shard.user_rows)  # in batch order
        torch.testing.assert_close(scores, expected_scores[torch.from_numpy(mine)], atol=1e-5,
                                   rtol=1e-5)
    # communication: ids of the batch's clips plus two all-reduces of at most
    # (union of the batch's clips) x d floats per graph, forward and backward
    union_clips = len(np.unique(_world()[1][batch])) * N_C
    bound = 2 * (2 * union_clips * DIM * 4) + 2 * 8 * (union_clips + 1)
    if mode == "owned features":  # + the batch clips' H_c^(0) from their owners
        bound += 2 * union_clips * DIM * 4 + 8 * (union_clips + 1)
    assert 0 < got["bytes"] <= bound


def test_owners_keep_only_the_videos_of_some_workers_graph():
    """Catalogue videos without any interaction are in no batch and no evaluated pair: no owner
    keeps their features (one process here; the all-reduce of the mask runs in the W = 2 and 3
    "owned features" parity runs above)."""
    present = videos_of_any_worker(7, np.array([0, 2, 3, 6]))
    assert present.tolist() == [True, False, True, True, False, False, True]
    assert owned_videos(7, 0, 2, present).tolist() == [0, 2, 6]
    assert owned_videos(7, 1, 2, present).tolist() == [3]
    assert owned_videos(7, 1, 2).tolist() == [1, 3, 5]


def test_shard_rows_cover_the_graph_exactly():
    users, videos, ratio, full, _ = _world()
    graph, _, shards = _shards(users, videos, ratio, full, 3)
    rebuilt = sp.lil_matrix(graph.pos_norm.shape, dtype=np.float32)
    for s in shards:
        cols = clip_ids(s.video_ids, N_C)
        block = s.pos.toarray()
        for i, row in enumerate(s.user_rows):
            rebuilt[row, cols] = block[i]
    np.testing.assert_array_equal(rebuilt.toarray(), graph.pos_norm.toarray())
    assert sorted(np.concatenate([s.user_rows for s in shards]).tolist()) == list(range(N_USERS))


def test_local_batch_takes_each_workers_members_in_batch_order():
    """Every position of a global batch lands on exactly one of the W workers, as that worker's
    training row of that interaction, in the batch's order; the loss divides by B / W."""
    users, videos, ratio, full, _ = _world()
    _, _, shards = _shards(users, videos, ratio, full, 3)
    data = [WorkerData.from_shard(s, N_C, len(users), None) for s in shards]
    positions = np.random.default_rng(5).permutation(len(users))[:50]  # a global batch
    got, taken = {}, 0
    for w, (shard, d) in enumerate(zip(shards, data)):
        assert len(d.train_order) == len(shard.train["order"])  # O(local rows), not O(N)
        batch = d.local_batch(positions, 50, 3, "cpu")
        assert batch.denominator == pytest.approx(50 / 3)
        mine = [p for p in positions if p in set(shard.train["order"].tolist())]
        row_of = {int(o): i for i, o in enumerate(shard.train["order"])}
        expected_rows = [row_of[int(p)] for p in mine]  # in batch order
        assert batch.users.tolist() == shard.train["user"][expected_rows].tolist()
        assert batch.videos.tolist() == shard.train["video"][expected_rows].tolist()
        got.update({int(p): w for p in mine})
        taken = taken + len(batch.users)
    assert sorted(got) == sorted(positions.tolist()) and taken == 50  # each on exactly one
    empty = WorkerData.from_shard(shards[0], N_C, len(users), None)
    empty.train_order, empty.train_row_of_order = np.zeros(0, np.int64), np.zeros(0, np.int64)
    assert len(empty.local_batch(positions, 50, 3, "cpu").users) == 0  # a worker without rows


def test_partition_balances_edges():
    weights = np.random.default_rng(0).integers(1, 100, 1000)
    shard = partition_users(weights, 4)
    loads = np.bincount(shard, weights=weights, minlength=4)
    assert loads.max() - loads.min() <= weights.max()
    assert np.bincount(shard).tolist() == [250] * 4
