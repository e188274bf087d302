"""A trained model's embeddings over the whole committed graph, computed once (score stage).

What scoring needs: H_c (C, d) for every clip of the graph (C = N N_c, clip v * N_c + j,
also the videos nobody interacted with) and H_u^p, H_u^n (M, d) for every user (row i = user i
of the graph manifest), plus the global (user, video) index of every training interaction.

* **One shard** (``graph.n_shards == 1``): :func:`whole_graph_embeddings`, one process,
  ``FRAME.embeddings`` over ``frame_dist.worker_data.whole_graph``.
* **P > 1 shards**: :func:`sharded_embeddings`, a map over the shards and a sum, the math of
  ``frame_dist.distributed.DistributedPropagation`` with Ray tasks instead of a process group:

  - map, one Ray task per shard k (:func:`shard_partials`): loads shard k alone
    (``load_shards``) and the clip features of its V_k videos, computes H_c^(0) of its C_k =
    V_k N_c clips, its users' H_u^p, H_u^n (eq. 7: local, a user's row is whole in its shard)
    and the partial sums S_k = R~_k^T H_u^k of eq. 8 (before W^(2) and ReLU) of its clips,
    keyed by global clip id (``RecordedClipSums``);
  - reduce, on the driver: S = sum_k S_k, added in shard order (the same bits on every run),
    then eqs. 8-10 through ``model.propagate`` with ``SummedClipSums`` (a propagation without
    users whose clip side returns S): H_c = alpha_0 H_c^(0) + alpha_1 Mean(ReLU(S^p W_p^(2)),
    ReLU(S^n W_n^(2))).

  A task's memory is its shard: R~_k rows, C_k x F clip features and C_k x d tables (plus the
  model and the graph manifest, which lists every id). It sends back (C_k x d) x 3 floats
  (H_c^(0) and both partial sums; 2 without the negative graph, H_c^(0) left out when the model
  owns its clip table), (M_k x d) x 2 floats, C_k + M_k ids and 16 bytes per training
  interaction. The driver holds C x d tables (H_c^(0), S^p, S^n, H_c), the user tables, and one
  task's result at a time; it computes H_c^(0) itself only for videos in no shard (nobody
  interacted with them), from their clip features, a block of videos at a time.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from feature_store.store import Store
from frame_dist.distributed import RecordedClipSums, SummedClipSums
from frame_dist.graph import adjacency
from frame_dist.model import FRAME
from frame_dist.partition import (
    PartitionError,
    load_clip_features,
    load_shards,
    read_graph_manifest,
)
from frame_dist.propagation import PropagationGraph
from frame_dist.worker_data import whole_graph

ORPHAN_VIDEOS_PER_BLOCK = 1024  # videos in no shard: clip features read this many at a time


@dataclass
class GraphEmbeddings:
    """One propagation over the whole graph, in the global space (module docstring)."""

    h_c: Tensor  # (C, d) H_c of eq. 10, clip v * N_c + j
    h_u_pos: Tensor  # (M, d) H_u^p of eq. 7, manifest user order
    h_u_neg: Tensor | None  # (M, d) H_u^n; None without the negative graph
    train_users: np.ndarray  # (n_train,) global user index of every training interaction
    train_videos: np.ndarray  # (n_train,) global video index
    manifest: dict[str, Any]  # the graph manifest
    tasks: int  # shard tasks that computed it (0: the single-process path)
    bytes_from_tasks: int  # payload the tasks sent to the driver
    seconds: float


@dataclass
class ShardPartials:
    """What one shard's task sends back (global ids; float32 arrays)."""

    index: int
    user_rows: np.ndarray  # (M_k,) global user of each row
    h_u_pos: np.ndarray  # (M_k, d)
    h_u_neg: np.ndarray | None  # (M_k, d)
    clip_ids: np.ndarray  # (C_k,) global clip id of each local clip (ascending)
    h_c0: np.ndarray | None  # (C_k, d) H_c^(0); None when the model owns its clip table
    pos_sums: np.ndarray  # (C_k, d) R~^p_k^T H_u^p
    neg_sums: np.ndarray | None  # (C_k, d) R~^n_k^T H_u^n
    train_users: np.ndarray  # (n_k,) global
    train_videos: np.ndarray  # (n_k,) global

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))


def reads_clip_features(model: FRAME) -> bool:
    """False when the model owns its clip table (free embeddings or trainable features)."""
    return model.use_visual and not getattr(model, "trainable_clip_features", False)


def rebuild_model(saved: dict[str, Any]) -> FRAME:
    """FRAME from ``{"model_args", "state_dict"}`` (model.pt's keys), in eval mode."""
    model = FRAME(**saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def graph_embeddings(model: FRAME, store: Store, n_clips: int, task_cpus: float = 1.0
                     ) -> GraphEmbeddings:
    """H_c, H_u^p, H_u^n of the committed graph for N_c: one process for one shard, else one
    Ray task per shard (module docstring)."""
    manifest = read_graph_manifest(store, n_clips)
    if manifest is None:
        raise PartitionError(f"no committed graph for N_c={n_clips} in {store.uri('graphs')}: "
                             "run the graph stage first")
    n_total = manifest["n_videos"] * n_clips
    if not reads_clip_features(model) and model.n_clips_total != n_total:
        raise PartitionError(f"the model's clip table has {model.n_clips_total} rows, the graph "
                             f"N_c={n_clips} has {n_total} clips")
    if manifest["n_shards"] == 1:
        return whole_graph_embeddings(model, store, n_clips)
    return sharded_embeddings(model, store, n_clips, task_cpus)


@torch.inference_mode()
def whole_graph_embeddings(model: FRAME, store: Store, n_clips: int) -> GraphEmbeddings:
    """The single-process path: every shard merged, ``model.embeddings`` once."""
    start = time.monotonic()
    data, manifest = whole_graph(store, n_clips, model.use_negative,
                                 with_features=reads_clip_features(model))
    h_c, h_u_pos, h_u_neg = model.embeddings(data.clip_features, data.graph)
    return GraphEmbeddings(h_c, h_u_pos, h_u_neg, data.user_rows[data.train_users.numpy()],
                           data.video_ids[data.train_videos.numpy()], manifest, tasks=0,
                           bytes_from_tasks=0, seconds=time.monotonic() - start)


@torch.inference_mode()
def shard_partials(saved: dict[str, Any], store: Store, n_clips: int, index: int
                   ) -> ShardPartials:
    """The map step for shard ``index`` (a Ray task; plain function, also callable directly)."""
    model = rebuild_model(saved)
    shard, manifest = load_shards(store, n_clips, [index])
    features = None
    if reads_clip_features(model):
        features = torch.from_numpy(load_clip_features(store, manifest, shard.video_ids))
    clip_ids = (shard.video_ids[:, None] * n_clips + np.arange(n_clips)).reshape(-1)  # (C_k,)
    graph = PropagationGraph(adjacency(shard.pos),
                             adjacency(shard.neg) if model.use_negative else None,
                             clips_per_video=n_clips, clip_ids=torch.from_numpy(clip_ids))
    h_c0 = model.clip_input(features, graph.clip_ids)  # (C_k, d) H_c^(0)
    recorded = RecordedClipSums(graph)
    model.propagation = recorded
    _, h_u_pos, h_u_neg = model.propagate(h_c0, graph)  # (M_k, d) each; h_c partial: dropped

    def numpy(x: Tensor | None) -> np.ndarray | None:
        return None if x is None else x.numpy()

    return ShardPartials(
        index, shard.user_rows, h_u_pos.numpy(), numpy(h_u_neg), clip_ids,
        h_c0.numpy() if features is not None else None, recorded.sums["pos"].numpy(),
        numpy(recorded.sums.get("neg")), shard.user_rows[shard.train["user"]],
        shard.video_ids[shard.train["video"]])


@torch.inference_mode()
def sharded_embeddings(model: FRAME, store: Store, n_clips: int, task_cpus: float = 1.0
                       ) -> GraphEmbeddings:
    """One Ray task per shard (:func:`shard_partials`), summed on the driver (module doc)."""
    import ray

    from frame_dist.ray_runtime import init_ray

    start = time.monotonic()
    manifest = read_graph_manifest(store, n_clips)
    if manifest is None:
        raise PartitionError(f"no committed graph for N_c={n_clips}: run the graph stage first")
    n_users, n_total, d = manifest["n_users"], manifest["n_videos"] * n_clips, model.dim
    init_ray()
    saved = ray.put({"model_args": model.model_args(), "state_dict": model.state_dict()})
    task = ray.remote(num_cpus=task_cpus, max_retries=2)(shard_partials)
    refs = [task.remote(saved, store, n_clips, k) for k in range(manifest["n_shards"])]

    h_c0 = torch.zeros(n_total, d)  # (C, d)
    have_h_c0 = torch.zeros(n_total, dtype=torch.bool)
    sums = {"pos": torch.zeros(n_total, d),  # (C, d) sum_k R~_k^T H_u^k
            "neg": torch.zeros(n_total, d) if model.use_negative else None}
    h_u = {"pos": torch.zeros(n_users, d),  # (M, d) each
           "neg": torch.zeros(n_users, d) if model.use_negative else None}
    user_count = np.zeros(n_users, dtype=np.int64)
    train_users, train_videos, received = [], [], 0
    for k in range(len(refs)):  # shard order: a fixed order of the additions
        part: ShardPartials = ray.get(refs[k])
        refs[k] = None  # the object store may free it
        received += part.nbytes
        with warnings.catch_warnings():  # object-store arrays are read-only; never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            ids = torch.from_numpy(part.clip_ids)
            sums["pos"].index_add_(0, ids, torch.from_numpy(part.pos_sums))
            if sums["neg"] is not None:
                sums["neg"].index_add_(0, ids, torch.from_numpy(part.neg_sums))
            if part.h_c0 is not None:
                h_c0[ids] = torch.from_numpy(part.h_c0)
                have_h_c0[ids] = True
            rows = torch.from_numpy(part.user_rows)
            h_u["pos"][rows] = torch.from_numpy(part.h_u_pos)
            if h_u["neg"] is not None:
                h_u["neg"][rows] = torch.from_numpy(part.h_u_neg)
        np.add.at(user_count, part.user_rows, 1)
        train_users.append(np.array(part.train_users))
        train_videos.append(np.array(part.train_videos))
        del part
    if not (user_count == 1).all():
        raise PartitionError(f"graph N_c={n_clips}: its shards hold {int(user_count.sum())} "
                             f"user rows, not each of the manifest's {n_users} users once")

    if reads_clip_features(model):
        _fill_orphan_clips(model, store, manifest, h_c0, have_h_c0)
    else:
        h_c0 = model.clip_input(None)  # (C, d) from the model's own table
    reduce = SummedClipSums(sums["pos"], sums["neg"], n_clips)
    before = model.propagation
    model.propagation = reduce
    try:
        h_c = model.propagate(h_c0, reduce.graph).h_c  # (C, d) eqs. 8-10
    finally:
        model.propagation = before
    return GraphEmbeddings(h_c, h_u["pos"], h_u["neg"],
                           np.concatenate(train_users), np.concatenate(train_videos), manifest,
                           tasks=len(refs), bytes_from_tasks=received,
                           seconds=time.monotonic() - start)


def _fill_orphan_clips(model: FRAME, store: Store, manifest: dict[str, Any], h_c0: Tensor,
                       have: Tensor) -> None:
    """H_c^(0) of the clips of videos in no shard (nobody interacted with them), in place."""
    n_clips = manifest["n_clips"]
    videos = np.flatnonzero(~have.view(-1, n_clips).all(1).numpy())  # (V_o,) global
    for first in range(0, len(videos), ORPHAN_VIDEOS_PER_BLOCK):
        block = videos[first:first + ORPHAN_VIDEOS_PER_BLOCK]
        features = torch.from_numpy(load_clip_features(store, manifest, block))  # (b N_c, F)
        clips = torch.from_numpy((block[:, None] * n_clips + np.arange(n_clips)).reshape(-1))
        h_c0[clips] = model.clip_input(features, clips)  # (b N_c, d)


__all__ = ["GraphEmbeddings", "ShardPartials", "graph_embeddings", "rebuild_model",
           "shard_partials", "sharded_embeddings", "whole_graph_embeddings"]
