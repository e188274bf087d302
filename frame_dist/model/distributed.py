"""Exact data-parallel propagation over a user-partitioned graph (torch.distributed only).

Each of the W workers holds the rows of R~^p and R~^n for its users, in its *local clip space*
(``frame_dist.graph.shards``): the clips of the videos its users interacted with. The two directions
of message passing then split as follows:

* users_from_clips, R~ H (eq. 7): each user's row is whole on its worker, so this is local.
* clips_from_users, R~^T H_u (eq. 8): the sum over a clip's users spans every worker. Each
  worker computes its partial sums for the clips the *global* batch needs, keyed by global clip
  id, and the partials are summed with an autograd-aware all-reduce
  (``torch.distributed.nn.functional.all_reduce``), whose backward all-reduces the gradient, so
  every worker's users receive the gradient of every worker's loss.

Communication per step and graph (positive, negative): one all-gather of the batch's clip ids
(int64, |U_w| per worker), then one all-reduce of a (|U|, d) float32 tensor (also under bf16
autocast: sums of sparse products stay fp32) in the forward and one in the backward, where U is
the union of the clips of the videos in the global batch (|U| <= B_global * N_c). Nothing
proportional to the clip table or to the number of users crosses the network.
``bytes_per_step()`` reports what was actually exchanged.

The result is exactly the single-process R~^T H_u restricted to those clips, up to the order
of floating-point additions.

Offline, without a process group (the score stage's embeddings, ``frame_dist.score.embeddings``),
the
same split runs as a map and a reduce: on each shard :class:`RecordedClipSums` keeps the
partial sums R~_k^T H_u^k of every local clip; the reducer adds them up over the shards and
hands the totals to the model through :class:`SummedClipSums`, a propagation with no users of
its own, so that the model applies W^(2), ReLU and eqs. 9-10 to the whole graph's sums.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from frame_dist.model.clip_inputs import FrozenClipInputs
from frame_dist.model.propagation import (
    Adjacency,
    LocalPropagation,
    PropagationGraph,
    csr_gather_rows,
    csr_tensor,
    csr_transpose,
    sparse_matmul,
)


class DistributedPropagation(LocalPropagation):
    """:class:`LocalPropagation` whose clip-side aggregation is summed over the workers.

    Args:
        global_clip_ids: (C_local,) int64, the global clip id of each local clip (ascending).
        group: the process group of the W workers (default: the world); a dedicated group keeps
            these collectives apart from the optimizer's gradient all-reduce.
    """

    def __init__(self, global_clip_ids: Tensor, group: dist.ProcessGroup | None = None):
        ids = global_clip_ids.to(torch.long)
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("DistributedPropagation: global_clip_ids must be strictly increasing")
        self.global_clip_ids = ids  # (C_local,)
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.bytes_sent = 0  # payload bytes this worker contributed to collectives

    def to(self, device: torch.device | str) -> DistributedPropagation:
        self.global_clip_ids = self.global_clip_ids.to(device)
        return self

    def reset_bytes(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent

    def clips_from_users(self, adj: Adjacency, x_users: Tensor,
                         clips: Tensor | None = None) -> Tensor:
        """(R~^T @ X)[clips] summed over every worker's users: (len(clips), d)."""
        if self.world == 1:
            return super().clips_from_users(adj, x_users, clips)
        device = x_users.device
        if clips is None:
            clips = torch.arange(adj.n_clips, device=device)
        clips = clips.to(device=device, dtype=torch.long)
        ids = self.global_clip_ids.to(device)
        mine = ids[clips]  # (n,) global ids this worker needs
        union = self._union(mine)  # (U,) sorted global ids every worker needs
        at, present = _positions(ids, union)  # rows of U this worker has neighbours for
        rows = csr_gather_rows(adj.transpose, at[present])  # (P, M_local)
        partial = sparse_matmul(rows, x_users, lambda: csr_transpose(rows))  # (P, d) fp32
        return self.sum_rows(partial, present, union, mine)  # (n, d) the whole graph's sums

    def sum_rows(self, partial: Tensor, present: Tensor, union: Tensor, mine: Tensor) -> Tensor:
        """Rows of ``union`` summed over every worker, then this worker's ``mine`` of them.

        ``partial`` (P, d) holds this worker's rows for the entries of ``union`` where
        ``present``; the others count as 0. One differentiable (U, d) all-reduce (its bytes,
        forward and backward, in ``bytes_sent``); returns (len(mine), d).
        """
        full = partial.new_zeros(union.numel(), partial.shape[1]).index_copy(
            0, torch.nonzero(present).squeeze(1), partial)  # (U, d)
        self.bytes_sent += 2 * full.numel() * full.element_size()  # forward + backward
        total = _all_reduce_sum(full, self.group)  # (U, d)
        return total[torch.searchsorted(union, mine)]  # (n, d)

    def max_over_workers(self, n: int) -> int:
        if self.world == 1:
            return n
        largest = torch.tensor([n], dtype=torch.long, device=self.global_clip_ids.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.group)
        return int(largest)

    def _union(self, ids: Tensor) -> Tensor:
        """Sorted union of every worker's ``ids`` (variable lengths: gather sizes, then pad)."""
        size = torch.tensor([ids.numel()], dtype=torch.long, device=ids.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        longest = int(max(int(s) for s in sizes))
        padded = torch.full((longest,), -1, dtype=torch.long, device=ids.device)
        padded[:ids.numel()] = ids
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        self.bytes_sent += (padded.numel() + 1) * padded.element_size()
        everything = torch.cat(gathered)
        return torch.unique(everything[everything >= 0])  # sorted


def owned_videos(n_videos: int, rank: int, world: int,
                 present: np.ndarray | None = None) -> np.ndarray:
    """Global video indices whose clip features worker ``rank`` of ``world`` keeps: v % W == rank
    (C / W clips each, whatever the popularity), of the videos where ``present`` (an (N,) bool
    mask: the videos local to some worker, see :func:`videos_of_any_worker`; None: all)."""
    owned = np.arange(rank, n_videos, world, dtype=np.int64)
    return owned if present is None else owned[present[owned]]


def videos_of_any_worker(n_videos: int, local_videos: np.ndarray,
                         group: dist.ProcessGroup | None = None,
                         device: torch.device | str = "cpu") -> np.ndarray:
    """(N,) bool: the videos in some worker's local clip space (``local_videos``: this worker's
    global video indices), by a one-byte-per-video all-reduce. The others (catalogue videos
    without any interaction) are never in a batch or an evaluated pair: nobody keeps their
    features. ``device``: the group's (CUDA under NCCL)."""
    mask = torch.zeros(n_videos, dtype=torch.uint8, device=device)
    mask[torch.as_tensor(local_videos, dtype=torch.long, device=device)] = 1
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
    return mask.cpu().numpy().astype(bool)


class OwnedClipInputs(FrozenClipInputs):
    """:class:`FrozenClipInputs` on W workers, the clip features partitioned by owner.

    This worker keeps the features of the clips it owns (``owned_videos``: C / W x F) and the
    precomputed R~ X of its own users (M_w x F, built from the store one part at a time with
    ``streamed_user_sums``), never all of its local clips' features. H_c^(0) of a batch's clips
    (eq. 10) is computed by their owners: every worker encodes its owned clips of the union of
    every worker's batch clips into a (U, d) zero tensor, and an autograd-aware all-reduce sums
    them (one owner per row), whose backward brings every worker's gradient to the owners. The
    payload (ids, and (U, d) float32 forward and backward) follows the batch and is counted in
    ``propagation.bytes_sent``.

    Args:
        owned_clip_ids: (C_own,) ascending global ids of the clips whose features are here.
        features: (C_own, F) their features.
        pos, neg: (R~ X, R~ 1) of this worker's users (``streamed_user_sums``).
        propagation: the model's :class:`DistributedPropagation` (its local clip ids, group,
            and byte counter).
    """

    def __init__(self, owned_clip_ids: Tensor, features: Tensor, pos: tuple[Tensor, Tensor],
                 neg: tuple[Tensor, Tensor] | None, propagation: DistributedPropagation):
        super().__init__(features, pos, neg)
        ids = owned_clip_ids.to(torch.long)
        if tuple(features.shape[:1]) != tuple(ids.shape):
            raise ValueError(f"OwnedClipInputs: {ids.numel()} owned clip ids for "
                             f"{features.shape[0]} feature rows")
        self.register_buffer("owned_clip_ids", ids, persistent=False)
        self.propagation = propagation

    def clip_rows(self, encode: Callable[[Tensor], Tensor], clips: Tensor | None) -> Tensor:
        prop = self.propagation
        local_ids = prop.global_clip_ids.to(self.owned_clip_ids.device)
        mine = local_ids if clips is None else local_ids[clips]  # (n,) global ids I need
        union = prop._union(mine)  # (U,) sorted, every worker's
        at, present = _positions(self.owned_clip_ids, union)  # the rows I own
        encoded = encode(self.features[at[present]]).float()  # (P, d) my share of the rows
        return prop.sum_rows(encoded, present, union, mine)  # (n, d) every row from its owner


class RecordedClipSums(LocalPropagation):
    """:class:`LocalPropagation` on one shard that keeps its clip-side partial sums (eq. 8).

    ``sums["pos"]``, ``sums["neg"]``: R~_k^T H_u^k, (C_local, d), the sums of eq. 8 over this
    shard's users *before* W^(2) and ReLU, in the shard's local clip order. The clip embeddings
    the model derives from them on this shard alone are partial and meant to be discarded; the
    user side (eq. 7) is whole, as every user's row lives in one shard.

    Example::

        >>> prop = RecordedClipSums(graph)
        >>> _, h_u_pos, h_u_neg = model.propagate(h_c0, graph, propagation=prop)  # h_c: partial
        >>> prop.sums["pos"].shape                               # (C_local, d)
    """

    def __init__(self, graph: PropagationGraph):
        self.graph = graph
        self.sums: dict[str, Tensor] = {}

    def clips_from_users(self, adj: Adjacency, x_users: Tensor,
                         clips: Tensor | None = None) -> Tensor:
        partial = super().clips_from_users(adj, x_users, clips)  # (n, d)
        self.sums["pos" if adj is self.graph.pos else "neg"] = partial
        return partial


class SummedClipSums(LocalPropagation):
    """The reduce side: clip sums of eq. 8 already added up over every shard, and no user.

    ``pos_sums``, ``neg_sums`` (C, d): sum_k R~_k^T H_u^k over the shards, in global clip order.
    ``graph`` is a user-less (0 x C) graph over the same clips; ``model.propagate(h_c0, graph,
    propagation=this)`` applies W^(2), ReLU (eq. 8), the mean (eq. 9) and the layer
    combination (eq. 10) to the whole graph's sums: the role of
    :class:`DistributedPropagation`'s all-reduce, with the sum done before the call.
    """

    def __init__(self, pos_sums: Tensor, neg_sums: Tensor | None, clips_per_video: int):
        n_clips = pos_sums.shape[0]
        self.pos_sums, self.neg_sums = pos_sums, neg_sums
        self.graph = PropagationGraph(_no_users(n_clips),
                                      None if neg_sums is None else _no_users(n_clips),
                                      clips_per_video)

    def users_from_clips(self, adj: Adjacency, x_clips: Tensor) -> Tensor:
        return x_clips.new_zeros(0, x_clips.shape[1])  # (0, d): no user lives here

    def clips_from_users(self, adj: Adjacency, x_users: Tensor,
                         clips: Tensor | None = None) -> Tensor:
        total = self.pos_sums if adj is self.graph.pos else self.neg_sums  # (C, d)
        return total if clips is None else total[clips]


def _no_users(n_clips: int) -> Adjacency:
    """An empty (0 x C) adjacency and its (C x 0) transpose."""
    empty = torch.zeros(0, dtype=torch.long)
    return Adjacency(csr_tensor(torch.zeros(1, dtype=torch.long), empty, torch.zeros(0),
                                (0, n_clips)),
                     csr_tensor(torch.zeros(n_clips + 1, dtype=torch.long), empty,
                                torch.zeros(0), (n_clips, 0)))


def _positions(ids: Tensor, union: Tensor) -> tuple[Tensor, Tensor]:
    """(position in ``ids``, found) of each entry of ``union``; ``ids`` ascending, maybe empty
    (a worker whose users have no videos, or that owns no clip)."""
    if not ids.numel():
        return torch.zeros_like(union), torch.zeros_like(union, dtype=torch.bool)
    at = torch.searchsorted(ids, union).clamp(max=ids.numel() - 1)  # (U,)
    return at, ids[at] == union


def _all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Differentiable SUM all-reduce: backward all-reduces the incoming gradient."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a non-differentiable collective
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x, op=dist.ReduceOp.SUM,
                          group=group if group is not None else dist.group.WORLD)
