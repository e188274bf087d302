"""What one training worker holds, and how it draws its share of each global batch.

Pure torch / numpy (no Ray, no DeepSpeed): the Ray Train loop (``frame_dist.train.ray_loop``) and
the
tests build the same :class:`WorkerData` from a shard. :func:`whole_graph` is the single-process
case (one worker holding every shard, in the global space): what the evaluate stage, the score
stage's one-shard path and the benchmarks propagate over.

Batches: every worker draws the same global permutation of the N training interactions
(``frame_dist.train.loop.epoch_permutation``, the sampler of the single-process trainer too),
cuts it into global batches of B, and keeps the members that belong to its own users.
So each worker samples only its own interactions, the union over workers is exactly the
single-process batch, and the loss of each local part is divided by B / W so that DeepSpeed's
gradient averaging over W workers yields the gradient of the global batch's loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from feature_store.store import Store
from frame_dist.graph.clip_graph import adjacency
from frame_dist.graph.manifest import GraphManifest
from frame_dist.graph.shards import (
    Shard,
    load_clip_features,
    load_whole_graph,
    stream_clip_features,
)
from frame_dist.model.clip_inputs import FrozenClipInputs, streamed_user_sums
from frame_dist.model.distributed import (
    DistributedPropagation,
    OwnedClipInputs,
    owned_videos,
    videos_of_any_worker,
)
from frame_dist.model.loss import InteractionBatch
from frame_dist.model.propagation import PropagationGraph, clip_ids


@dataclass
class WorkerData:
    """One worker's graph rows, clip features and interactions, as tensors."""

    graph: PropagationGraph  # local users x local clips
    # (C_local, F) float32, or as FrozenClipInputs (the training loop swaps them in, frozen
    # features only); None without visual features
    clip_features: Tensor | FrozenClipInputs | None
    global_clip_ids: Tensor  # (C_local,) global clip id of each local clip (ascending)
    user_rows: np.ndarray  # (M_local,) global user index of each local row
    video_ids: np.ndarray  # (V_local,) global video index of each local video
    train_users: Tensor  # (n_local,) local rows
    train_videos: Tensor  # (n_local,) local videos
    train_watched: Tensor  # (n_local,) clip labels
    train_order: np.ndarray  # (n_local,) sorted global training positions of the local rows
    train_row_of_order: np.ndarray  # (n_local,) local train row of each of them
    n_train_global: int
    eval_sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # split -> users, videos, y
    user_ids: pa.Array | None = None  # (M_local,) string id of each local row

    @classmethod
    def from_shard(cls, shard: Shard, n_clips: int, n_train_global: int,
                   clip_features: np.ndarray | None, with_negative: bool = True) -> WorkerData:
        clips = clip_ids(shard.video_ids, n_clips)  # (C_local,) global clip id of local clip
        graph = PropagationGraph(pos=adjacency(shard.pos),
                                 neg=adjacency(shard.neg) if with_negative else None,
                                 clips_per_video=n_clips, clip_ids=torch.from_numpy(clips))
        sort = np.argsort(shard.train["order"], kind="stable")  # O(local rows), not O(N_train)
        t = shard.train
        return cls(
            graph=graph,
            clip_features=None if clip_features is None else torch.from_numpy(
                np.ascontiguousarray(clip_features, dtype=np.float32)),
            global_clip_ids=torch.from_numpy(clips.copy()),  # not shared with the graph's
            user_rows=shard.user_rows, video_ids=shard.video_ids,
            train_users=torch.from_numpy(t["user"].astype(np.int64)),
            train_videos=torch.from_numpy(t["video"].astype(np.int64)),
            train_watched=torch.from_numpy(t["watched"].astype(np.int64)),
            train_order=np.asarray(shard.train["order"], dtype=np.int64)[sort],
            train_row_of_order=sort.astype(np.int64), n_train_global=n_train_global,
            eval_sets={s: (getattr(shard, s)["user"], getattr(shard, s)["video"],
                           getattr(shard, s)["label"].astype(np.int64))
                       for s in ("valid", "test")},
            user_ids=shard.user_ids,
        )

    def to(self, device: torch.device | str) -> WorkerData:
        self.graph = self.graph.to(device)
        if self.clip_features is not None:
            self.clip_features = self.clip_features.to(device)
        self.global_clip_ids = self.global_clip_ids.to(device)
        return self

    def local_batch(self, global_positions: np.ndarray, batch_size: int, world: int,
                    device: torch.device | str) -> InteractionBatch:
        """This worker's members of one global batch; the loss divides by B / W."""
        positions = np.asarray(global_positions, dtype=np.int64)
        at = np.searchsorted(self.train_order, positions)
        hit = at < len(self.train_order)
        hit[hit] = self.train_order[at[hit]] == positions[hit]
        local = torch.from_numpy(self.train_row_of_order[at[hit]]).to(self.train_users.device)
        return InteractionBatch(self.train_users[local].to(device),
                                self.train_videos[local].to(device),
                                self.train_watched[local].to(device),
                                denominator=len(global_positions) / world)


def whole_graph(store: Store, n_clips: int, use_negative: bool = True,
                with_features: bool = True) -> tuple[WorkerData, GraphManifest]:
    """The whole committed graph as one process's WorkerData (a single worker holding every shard).

    In the global space (``frame_dist.graph.shards.load_whole_graph``): row i is user i of the
    manifest, clip v * N_c + j is clip j of video v, every video of the graph included.
    ``with_features=False`` skips the (N N_c, F) clip features (a model that owns its clip
    table does not read them). Returns (data, graph manifest).
    """
    shard, manifest = load_whole_graph(store, n_clips)
    features = load_clip_features(store, manifest, shard.video_ids) if with_features else None
    data = WorkerData.from_shard(shard, n_clips, manifest.n_train, features,
                                 with_negative=use_negative)
    return data, manifest


def owned_clip_inputs(store: Store, manifest: GraphManifest, data: WorkerData,
                      propagation: DistributedPropagation, rank: int, world: int
                      ) -> OwnedClipInputs:
    """This worker's clip input on W > 1 workers with frozen features: the features of the clips
    it owns (C / W x F, of the videos some worker's users interacted with) and R~ X of its
    users, streamed from the store one part at a time
    (``frame_dist.model.distributed.OwnedClipInputs``). Tensors on the graph's device."""
    n_c = data.graph.clips_per_video
    device = data.graph.pos.matrix.device
    blocks = ((torch.from_numpy(clip_ids(rows, n_c)), torch.from_numpy(x.reshape(-1, x.shape[-1])))
              for rows, x in stream_clip_features(store, manifest, data.video_ids))
    pos, neg = streamed_user_sums(data.graph, blocks, len(manifest.feature_mean))
    present = videos_of_any_worker(manifest.n_videos, data.video_ids, propagation.group,
                                   propagation.global_clip_ids.device)
    owned = owned_videos(manifest.n_videos, rank, world, present)
    features = torch.from_numpy(load_clip_features(store, manifest, owned)).to(device)
    return OwnedClipInputs(torch.from_numpy(clip_ids(owned, n_c)).to(device), features, pos,
                           neg, propagation)
