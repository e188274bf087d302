"""Exact data-parallel propagation over a user-partitioned graph (torch.distributed only).

Each of the W workers holds the rows of R~^p and R~^n for its users, in its *local clip space*
(``frame_dist.partition``): the clips of the videos its users interacted with. The two directions
of message passing then split as follows:

* users_from_clips, R~ H (eq. 7): each user's row is whole on its worker, so this is local.
* clips_from_users, R~^T H_u (eq. 8): the sum over a clip's users spans every worker. Each
  worker computes its partial sums for the clips the *global* batch needs, keyed by global clip
  id, and the partials are summed with an autograd-aware all-reduce
  (``torch.distributed.nn.functional.all_reduce``), whose backward all-reduces the gradient, so
  every worker's users receive the gradient of every worker's loss.

Communication per step and graph (positive, negative): one all-gather of the batch's clip ids
(int64, |U_w| per worker), then one all-reduce of a (|U|, d) float tensor in the forward and one
in the backward, where U is the union of the clips of the videos in the global batch
(|U| <= B_global * N_c). Nothing proportional to the clip table or to the number of users
crosses the network. ``bytes_per_step()`` reports what was actually exchanged.

The result is exactly the single-process R~^T H_u restricted to those clips, up to the order
of floating-point additions.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from frame_dist.propagation import (
    Adjacency,
    LocalPropagation,
    csr_gather_rows,
    csr_select_columns,
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
        # rows of U that this worker has neighbours for
        if ids.numel():
            at = torch.searchsorted(ids, union).clamp(max=ids.numel() - 1)  # (U,)
            present = ids[at] == union  # (U,)
        else:  # a worker whose users have no videos (possible on tiny data)
            at = torch.zeros_like(union)
            present = torch.zeros_like(union, dtype=torch.bool)
        local = at[present]  # local clip index of each present union entry
        rows = csr_gather_rows(adj.transpose, local)  # (P, M_local)
        partial_present = sparse_matmul(rows, x_users,  # (P, d); distinct local clips, so the
                                        lambda: csr_select_columns(adj.matrix, local))  # cheap T
        partial = x_users.new_zeros(union.numel(), x_users.shape[1]).index_copy(
            0, torch.nonzero(present).squeeze(1), partial_present)  # (U, d)
        self.bytes_sent += 2 * partial.numel() * partial.element_size()  # forward + backward
        total = _all_reduce_sum(partial, self.group)  # (U, d) the whole graph's sums
        return total[torch.searchsorted(union, mine)]  # (n, d)

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


def _all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Differentiable SUM all-reduce: backward all-reduces the incoming gradient."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a non-differentiable collective
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x, op=dist.ReduceOp.SUM,
                          group=group if group is not None else dist.group.WORLD)
