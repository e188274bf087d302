"""A trained model's embeddings over the whole committed graph, computed once (score stage).

H_c (C, d) for every clip v * N_c + j of the graph and every user's H_u^p, H_u^n (eq. 7).
:func:`propagate_shards`: one Ray streaming-generator task per shard (:func:`shard_task`, the
map), the clip sums of eq. 8 added on the driver (the reduce); each task's user side stays in
the object store. :func:`sharded_embeddings` gathers every user's H_u on the driver (tests,
small graphs); :func:`whole_graph_embeddings` is the single-process reference. Design and
memory: docs/score.md.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from feature_store.store import Store
from frame_dist.graph.clip_graph import adjacency
from frame_dist.graph.manifest import GraphManifest
from frame_dist.graph.shards import (
    PartitionError,
    load_clip_features,
    load_shards,
    read_graph_manifest,
)
from frame_dist.model.distributed import RecordedClipSums, SummedClipSums
from frame_dist.model.frame import FRAME
from frame_dist.model.propagation import PropagationGraph, clip_ids
from frame_dist.train.worker_data import whole_graph

ORPHAN_VIDEOS_PER_BLOCK = 1024  # videos in no shard: clip features read this many at a time


@dataclass
class GraphEmbeddings:
    """One propagation over the whole graph, in the global space (docs/score.md)."""

    h_c: Tensor  # (C, d) H_c of eq. 10, clip v * N_c + j
    h_u_pos: Tensor  # (M, d) H_u^p of eq. 7, manifest user order
    h_u_neg: Tensor | None  # (M, d) H_u^n; None without the negative graph
    train_users: np.ndarray  # (n_train,) global user index of every training interaction
    train_videos: np.ndarray  # (n_train,) global video index
    manifest: GraphManifest  # the graph's
    tasks: int  # shard tasks that computed it (0: the single-process path)
    bytes_from_tasks: int  # payload the tasks sent to the driver
    seconds: float


@dataclass
class ShardUsers:
    """The user side of one shard, inside its task (every row whole, eq. 7)."""

    index: int  # the shard
    user_rows: np.ndarray  # (M_k,) global user of each row, in the shard's order
    h_u_pos: Tensor  # (M_k, d)
    h_u_neg: Tensor | None  # (M_k, d)
    train_rows: np.ndarray  # (n_k,) row (0..M_k-1) of every training interaction
    train_videos: np.ndarray  # (n_k,) its global video
    user_ids: pa.Array  # (M_k,) string id of each row


@dataclass
class ClipPartials:
    """What one shard's task sends the driver (global ids; float32 arrays)."""

    index: int
    clip_ids: np.ndarray  # (C_k,) global clip id of each local clip (ascending)
    h_c0: np.ndarray | None  # (C_k, d) H_c^(0); None when the model owns its clip table
    pos_sums: np.ndarray  # (C_k, d) R~^p_k^T H_u^p
    neg_sums: np.ndarray | None  # (C_k, d) R~^n_k^T H_u^n
    users: int  # M_k
    cold_users: int  # users of the shard without any training interaction

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))


@dataclass
class ShardedPropagation:
    """The reduce's result: H_c on the driver, each shard's user side in the object store."""

    h_c: Tensor  # (C, d)
    user_refs: list[list[Any]]  # (P,) per shard: ObjectRefs of what user_side yielded
    cold_users: int  # over every shard
    manifest: GraphManifest
    bytes_from_tasks: int  # clip partials fetched by the driver
    seconds: float

    @property
    def tasks(self) -> int:
        return len(self.user_refs)


UserSide = Callable[[FRAME, ShardUsers], Iterable[Any]]


def reads_clip_features(model: FRAME) -> bool:
    """False when the model owns its clip table (free embeddings or trainable features)."""
    return model.use_visual and not getattr(model, "trainable_clip_features", False)


def rebuild_model(saved: dict[str, Any]) -> FRAME:
    """FRAME from ``{"model_args", "state_dict"}`` (model.pt's keys), in eval mode."""
    model = FRAME(**saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def _manifest(store: Store, n_clips: int, model: FRAME) -> GraphManifest:
    manifest = read_graph_manifest(store, n_clips)
    if manifest is None:
        raise PartitionError(f"no committed graph for N_c={n_clips} in {store.uri('graphs')}: "
                             "run the graph stage first")
    n_total = manifest.n_videos * n_clips
    if not reads_clip_features(model) and model.n_clips_total != n_total:
        raise PartitionError(f"the model's clip table has {model.n_clips_total} rows, the graph "
                             f"N_c={n_clips} has {n_total} clips")
    return manifest


@torch.inference_mode()
def whole_graph_embeddings(model: FRAME, store: Store, n_clips: int) -> GraphEmbeddings:
    """The whole graph merged in one process, ``model.embeddings`` once (the reference)."""
    start = time.monotonic()
    _manifest(store, n_clips, model)
    data, manifest = whole_graph(store, n_clips, model.use_negative,
                                 with_features=reads_clip_features(model))
    h_c, h_u_pos, h_u_neg = model.embeddings(data.clip_features, data.graph)
    return GraphEmbeddings(h_c, h_u_pos, h_u_neg, data.user_rows[data.train_users.numpy()],
                           data.video_ids[data.train_videos.numpy()], manifest, tasks=0,
                           bytes_from_tasks=0, seconds=time.monotonic() - start)


@torch.inference_mode()
def shard_task(saved: dict[str, Any], store: Store, n_clips: int, index: int,
               user_side: UserSide) -> Iterator[Any]:
    """The map step for shard ``index``, a generator (a Ray streaming-generator task): yields
    its :class:`ClipPartials`, then each object ``user_side(model, users)`` yields."""
    model = rebuild_model(saved)
    shard, manifest = load_shards(store, n_clips, [index])
    features = None
    if reads_clip_features(model):
        features = torch.from_numpy(load_clip_features(store, manifest, shard.video_ids))
    clips = clip_ids(shard.video_ids, n_clips)  # (C_k,)
    graph = PropagationGraph(adjacency(shard.pos),
                             adjacency(shard.neg) if model.use_negative else None,
                             clips_per_video=n_clips, clip_ids=torch.from_numpy(clips))
    h_c0 = model.clip_input(features, graph.clip_ids)  # (C_k, d) H_c^(0)
    recorded = RecordedClipSums(graph)
    # (M_k, d) each; h_c partial: dropped
    _, h_u_pos, h_u_neg = model.propagate(h_c0, graph, propagation=recorded)
    has_train = np.zeros(shard.n_users, dtype=bool)
    has_train[shard.train["user"]] = True
    neg_sums = recorded.sums.get("neg")
    yield ClipPartials(
        index, clips, h_c0.numpy() if features is not None else None,
        recorded.sums["pos"].numpy(), None if neg_sums is None else neg_sums.numpy(),
        users=shard.n_users, cold_users=int((~has_train).sum()))
    del features, graph, recorded, h_c0
    yield from user_side(model, ShardUsers(index, shard.user_rows, h_u_pos, h_u_neg,
                                           shard.train["user"],
                                           shard.video_ids[shard.train["video"]],
                                           shard.user_ids))


@torch.inference_mode()
def propagate_shards(model: FRAME, store: Store, n_clips: int, user_side: UserSide,
                     task_cpus: float = 1.0) -> ShardedPropagation:
    """One Ray task per shard (:func:`shard_task`), the clip sums reduced on the driver; the
    users' side stays in the object store, one object per item ``user_side`` yields (module
    docstring).

    ``user_side(model, users: ShardUsers)`` runs inside each task, yields the objects to keep,
    and must be picklable.
    """
    import ray

    from frame_dist.ray_runtime import init_ray

    start = time.monotonic()
    manifest = _manifest(store, n_clips, model)
    n_users, n_total, d = manifest.n_users, manifest.n_videos * n_clips, model.dim
    init_ray()
    saved = ray.put({"model_args": model.model_args(), "state_dict": model.state_dict()})
    task = ray.remote(num_cpus=task_cpus, max_retries=2, num_returns="streaming")(shard_task)
    generators = [task.remote(saved, store, n_clips, k, user_side)
                  for k in range(manifest.n_shards)]

    h_c0 = torch.zeros(n_total, d)  # (C, d)
    have_h_c0 = torch.zeros(n_total, dtype=torch.bool)
    sums = {"pos": torch.zeros(n_total, d),  # (C, d) sum_k R~_k^T H_u^k
            "neg": torch.zeros(n_total, d) if model.use_negative else None}
    users, cold, received = 0, 0, 0
    for k, generator in enumerate(generators):  # shard order: a fixed order of the additions
        part: ClipPartials = ray.get(next(generator))  # the task's first object
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
        if part.users != manifest.shards[k].users:
            raise PartitionError(f"graph N_c={n_clips}: shard {k} holds {part.users} users, "
                                 f"its manifest says {manifest.shards[k].users}")
        users += part.users
        cold += part.cold_users
        del part
    if users != n_users:
        raise PartitionError(f"graph N_c={n_clips}: its shards hold {users} "
                             f"user rows, not the manifest's {n_users} users")

    if reads_clip_features(model):
        _fill_orphan_clips(model, store, manifest, h_c0, have_h_c0)
    else:
        h_c0 = model.clip_input(None)  # (C, d) from the model's own table
    reduce = SummedClipSums(sums["pos"], sums["neg"], n_clips)
    h_c = model.propagate(h_c0, reduce.graph, propagation=reduce).h_c  # (C, d) eqs. 8-10
    user_refs = [list(generator) for generator in generators]  # references, never fetched
    return ShardedPropagation(h_c, user_refs, cold, manifest,
                              bytes_from_tasks=received, seconds=time.monotonic() - start)


def user_rows(model: FRAME, users: ShardUsers) -> Iterator[dict[str, np.ndarray | None]]:
    """A ``user_side`` that yields the users' rows as they are (global ids; float32)."""
    yield {"user_rows": users.user_rows, "h_u_pos": users.h_u_pos.numpy(),
            "h_u_neg": None if users.h_u_neg is None else users.h_u_neg.numpy(),
            "train_users": users.user_rows[users.train_rows],
            "train_videos": users.train_videos}


@torch.inference_mode()
def sharded_embeddings(model: FRAME, store: Store, n_clips: int, task_cpus: float = 1.0
                       ) -> GraphEmbeddings:
    """:func:`propagate_shards` with every user's H_u gathered into (M, d) tables."""
    import ray

    propagation = propagate_shards(model, store, n_clips, user_rows, task_cpus)
    manifest, d = propagation.manifest, model.dim
    n_users = manifest.n_users
    h_u = {"pos": torch.zeros(n_users, d),  # (M, d) each
           "neg": torch.zeros(n_users, d) if model.use_negative else None}
    user_count = np.zeros(n_users, dtype=np.int64)
    train_users, train_videos, received = [], [], propagation.bytes_from_tasks
    for refs in propagation.user_refs:
        (part,) = ray.get(refs)
        received += sum(a.nbytes for a in part.values() if a is not None)
        rows = torch.from_numpy(np.array(part["user_rows"]))
        h_u["pos"][rows] = torch.from_numpy(np.array(part["h_u_pos"]))
        if h_u["neg"] is not None:
            h_u["neg"][rows] = torch.from_numpy(np.array(part["h_u_neg"]))
        np.add.at(user_count, part["user_rows"], 1)
        train_users.append(np.array(part["train_users"]))
        train_videos.append(np.array(part["train_videos"]))
    if not (user_count == 1).all():
        raise PartitionError(f"graph N_c={n_clips}: its shards hold {int(user_count.sum())} "
                             f"user rows, not each of the manifest's {n_users} users once")
    return GraphEmbeddings(propagation.h_c, h_u["pos"], h_u["neg"],
                           np.concatenate(train_users), np.concatenate(train_videos), manifest,
                           tasks=propagation.tasks, bytes_from_tasks=received,
                           seconds=propagation.seconds)


def _fill_orphan_clips(model: FRAME, store: Store, manifest: GraphManifest, h_c0: Tensor,
                       have: Tensor) -> None:
    """H_c^(0) of the clips of videos in no shard (nobody interacted with them), in place."""
    n_clips = manifest.n_clips
    videos = np.flatnonzero(~have.view(-1, n_clips).all(1).numpy())  # (V_o,) global
    for first in range(0, len(videos), ORPHAN_VIDEOS_PER_BLOCK):
        block = videos[first:first + ORPHAN_VIDEOS_PER_BLOCK]
        features = torch.from_numpy(load_clip_features(store, manifest, block))  # (b N_c, F)
        clips = torch.from_numpy(clip_ids(block, n_clips))  # (b N_c,)
        h_c0[clips] = model.clip_input(features, clips)  # (b N_c, d)


__all__ = ["ClipPartials", "GraphEmbeddings", "ShardUsers", "ShardedPropagation",
           "propagate_shards", "reads_clip_features", "rebuild_model", "shard_task",
           "sharded_embeddings", "user_rows", "whole_graph_embeddings"]
