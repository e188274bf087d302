"""Sparse propagation over the user-clip graphs: the only place FRAME touches R~ (eqs. 7-8).

The model never multiplies by an adjacency itself; it asks a *propagation* object for the two
directions of message passing over one normalised user-clip matrix R~ (M_local x C):

* ``users_from_clips(adj, x_clips)``: R~ @ X, clips -> the local users (eq. 7). Each worker holds
  whole rows of R~ for its users, so this direction never needs communication.
* ``clips_from_users(adj, x_users, clips)``: (R~^T @ X)[clips], users -> clips (eq. 8). A clip's
  neighbours are spread over every worker, so on W workers this is a *sum of partial products*,
  one per worker. :class:`LocalPropagation` computes the single-process sum; a distributed
  subclass overrides this one method to all-reduce the partial sums (with an autograd-aware
  all-reduce, so gradients reach every worker's users). Restricting to ``clips`` (the clips a
  batch scores) keeps both the compute and that all-reduce proportional to the batch.

Both directions are differentiable in the dense operand and use a precomputed transpose in the
backward pass (torch's own CSR backward transposes the matrix on every call, ~4x slower).

The adjacency matrices are constants (no gradient); they live in :class:`Adjacency` (R~ and R~^T
as torch sparse CSR) inside a :class:`PropagationGraph`, built from scipy matrices by
``frame_dist.graph.clip_graph.to_torch``. Every helper here is vectorised torch (no Python loop
per edge) and runs on CPU or CUDA. :func:`clip_ids` defines the clip layout every stage shares:
clip j of video v is clip v * N_c + j.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch import Tensor


@overload
def clip_ids(videos: torch.Tensor, n_clips: int) -> torch.Tensor: ...


@overload
def clip_ids(videos: np.ndarray | Sequence[int] | int, n_clips: int) -> np.ndarray: ...


def clip_ids(videos, n_clips):
    """Clip indices of ``videos`` in the clip layout: (V * N_c,), entry i * N_c + j is
    ``videos[i] * N_c + j`` (clip j of video ``videos[i]``). A scalar is one video.

    The same for global video indices (global clips) and a shard's local ones (local clips).
    numpy in, int64 numpy out; a tensor in, a tensor on its device out.
    """
    if isinstance(videos, torch.Tensor):
        offsets = torch.arange(n_clips, dtype=videos.dtype, device=videos.device)
        return (videos.reshape(-1, 1) * n_clips + offsets).reshape(-1)
    videos = np.asarray(videos, dtype=np.int64).reshape(-1, 1)
    return (videos * n_clips + np.arange(n_clips, dtype=np.int64)).reshape(-1)


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A torch sparse CSR matrix from its arrays (int64 indices), without torch's beta warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return torch.sparse_csr_tensor(crow.long(), col.long(), values, size=shape,
                                       check_invariants=False)


def csr_gather_rows(matrix: Tensor, rows: Tensor) -> Tensor:
    """``matrix[rows]`` for a sparse CSR ``matrix``: a (len(rows), n_cols) CSR matrix.

    Vectorised: one ``repeat_interleave`` over the gathered non-zeros. Rows may repeat.
    """
    crow, col, val = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    rows = rows.to(device=crow.device, dtype=torch.long)
    start = crow[rows]  # (R,)
    counts = crow[rows + 1] - start  # (R,)
    new_crow = torch.zeros(rows.numel() + 1, dtype=torch.long, device=crow.device)
    torch.cumsum(counts, 0, out=new_crow[1:])
    nnz = int(new_crow[-1])
    row_of = torch.repeat_interleave(torch.arange(rows.numel(), device=crow.device), counts,
                                     output_size=nnz)  # (nnz,)
    pos = start[row_of] + torch.arange(nnz, device=crow.device) - new_crow[:-1][row_of]
    return csr_tensor(new_crow, col[pos], val[pos], (rows.numel(), matrix.shape[1]))


def csr_transpose(matrix: Tensor) -> Tensor:
    """The transpose of a sparse CSR matrix, as CSR (a stable sort of the non-zeros by column)."""
    crow, col, val = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    n_rows, n_cols = matrix.shape
    row = torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow.diff(),
                                  output_size=col.numel())
    order = torch.argsort(col, stable=True)
    new_crow = torch.zeros(n_cols + 1, dtype=torch.long, device=crow.device)
    torch.cumsum(torch.bincount(col, minlength=n_cols), 0, out=new_crow[1:])
    return csr_tensor(new_crow, row[order], val[order], (n_cols, n_rows))


class _SparseMatmul(torch.autograd.Function):
    """y = A @ x with dL/dx = A^T @ dL/dy; A^T given, built by a callable, or by a sort."""

    @staticmethod
    def forward(ctx, matrix: Tensor, transpose: Tensor | Callable[[], Tensor] | None,
                x: Tensor) -> Tensor:
        ctx.matrix, ctx.transpose = matrix, transpose
        with torch.autocast(x.device.type, enabled=False):  # CPU autocast would lower x to bf16
            return torch.sparse.mm(matrix, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor | None]:
        if not ctx.needs_input_grad[2]:
            return None, None, None
        transpose = ctx.transpose
        if transpose is None:
            transpose = csr_transpose(ctx.matrix)
        elif callable(transpose):
            transpose = transpose()
        with torch.autocast(grad.device.type, enabled=False):
            return None, None, torch.sparse.mm(transpose, grad.contiguous())


def sparse_matmul(matrix: Tensor, x: Tensor,
                  transpose: Tensor | Callable[[], Tensor] | None = None) -> Tensor:
    """``matrix @ x`` (sparse CSR times dense), differentiable in ``x``.

    ``transpose`` is ``matrix^T`` as CSR, or a callable building it (called only if a gradient
    is needed); without it the backward pass builds the transpose with a sort. Half-precision
    ``x`` (bf16/fp16 under autocast) is aggregated in the matrix's float32, autocast off, on
    CPU as on GPU; the result is float32.
    """
    if x.dtype in (torch.bfloat16, torch.float16) and matrix.dtype == torch.float32:
        x = x.float()
    if x.dtype != matrix.dtype:
        raise TypeError(f"sparse_matmul: matrix is {matrix.dtype} but x is {x.dtype}")
    return _SparseMatmul.apply(matrix, transpose, x)


@dataclass
class Adjacency:
    """One normalised user-clip matrix R~ (eq. 6) for the local users, with its transpose.

    ``matrix`` is R~ restricted to the local users' rows (M_local x C), ``transpose`` is R~^T
    (C x M_local); both torch sparse CSR with the same values. Constants: never trained.
    """

    matrix: Tensor  # (M_local, C) sparse CSR
    transpose: Tensor  # (C, M_local) sparse CSR

    @property
    def n_users(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n_clips(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def nnz(self) -> int:
        return int(self.matrix.values().numel())

    def to(self, device: torch.device | str) -> Adjacency:
        return Adjacency(self.matrix.to(device), self.transpose.to(device))


@dataclass
class PropagationGraph:
    """What the model propagates over: R~^p and R~^n for the local users, plus the clip layout.

    Clip ``c`` of the whole graph is clip ``j = c % clips_per_video`` of video
    ``c // clips_per_video``; rows are the local users (row i is global user ``user_rows[i]`` of
    the graph this came from; the model only sees local row indices).

    A worker's graph has a *local* clip axis (the clips of its users' videos); ``clip_ids`` maps
    it to global clip ids, which is what a model-owned clip table (free clip embeddings or
    trainable clip features) is indexed by. ``None`` means the clip axis is the global one.
    """

    pos: Adjacency  # R~^p, the positive graph (eq. 4 with eq. 2)
    neg: Adjacency | None  # R~^n, the negative graph (eq. 4 with eq. 3); None: not built
    clips_per_video: int  # N_c
    clip_ids: Tensor | None = None  # (C_local,) global clip id of each column; None: identity

    def __post_init__(self) -> None:
        if self.neg is not None and (self.neg.matrix.shape != self.pos.matrix.shape):
            raise ValueError(f"PropagationGraph: positive graph is {tuple(self.pos.matrix.shape)}"
                             f" but negative graph is {tuple(self.neg.matrix.shape)}")
        if self.clips_per_video <= 0 or self.pos.n_clips % self.clips_per_video:
            raise ValueError(f"PropagationGraph: {self.pos.n_clips} clips is not a multiple of "
                             f"clips_per_video={self.clips_per_video}")
        if self.clip_ids is not None and tuple(self.clip_ids.shape) != (self.pos.n_clips,):
            raise ValueError(f"PropagationGraph: clip_ids has shape {tuple(self.clip_ids.shape)}"
                             f", the graph has {self.pos.n_clips} clips")

    @property
    def n_users(self) -> int:
        """M_local: the users whose rows this graph holds."""
        return self.pos.n_users

    @property
    def n_clips(self) -> int:
        """C = N * N_c: every clip of every video (all workers share the clip axis)."""
        return self.pos.n_clips

    @property
    def n_videos(self) -> int:
        return self.pos.n_clips // self.clips_per_video

    def to(self, device: torch.device | str) -> PropagationGraph:
        return PropagationGraph(self.pos.to(device),
                                None if self.neg is None else self.neg.to(device),
                                self.clips_per_video,
                                None if self.clip_ids is None else self.clip_ids.to(device))


class LocalPropagation:
    """Message passing on one process: the whole sum over users is local.

    Subclass and override :meth:`clips_from_users` for data-parallel training on a user-partitioned
    graph: compute this class's local partial product for the union of every worker's ``clips``,
    all-reduce it (autograd-aware, so the backward all-reduces the gradient too) and return the
    rows of this worker's ``clips``. :meth:`users_from_clips` needs no change on W workers, as
    each worker holds full rows of R~ for its users.

    Example::

        >>> prop = LocalPropagation()
        >>> h_u = prop.users_from_clips(graph.pos, h_c0)          # (M_local, d)
        >>> h_c = prop.clips_from_users(graph.pos, h_u, clips)     # (len(clips), d)
    """

    def max_over_workers(self, n: int) -> int:
        """The largest ``n`` of every worker's (one process: ``n``): e.g. how many chunks of
        pairs each worker scores, as every worker joins every chunk's collectives."""
        return n

    def users_from_clips(self, adj: Adjacency, x_clips: Tensor) -> Tensor:
        """R~ @ X: (C, d) clip rows -> (M_local, d) user rows (the sums in eq. 7)."""
        if x_clips.shape[0] != adj.n_clips:
            raise ValueError(f"users_from_clips: x has {x_clips.shape[0]} rows, the graph has "
                             f"{adj.n_clips} clips")
        return sparse_matmul(adj.matrix, x_clips, adj.transpose)  # (M_local, d)

    def clips_from_users(self, adj: Adjacency, x_users: Tensor,
                         clips: Tensor | None = None) -> Tensor:
        """(R~^T @ X)[clips]: (M_local, d) user rows -> (len(clips), d) clip rows (eq. 8 sums).

        ``clips=None`` gives every clip (C, d). Otherwise only the gathered rows of R~^T are
        multiplied, and the backward pass multiplies by their transpose, a sort of the gathered
        non-zeros only: memory and time follow the batch's edges, not the graph's (a pass over
        R~'s columns was slower at every size measured, 1.2-1.6x).
        """
        if x_users.shape[0] != adj.n_users:
            raise ValueError(f"clips_from_users: x has {x_users.shape[0]} rows, the graph has "
                             f"{adj.n_users} users")
        if clips is None:
            return sparse_matmul(adj.transpose, x_users, adj.matrix)  # (C, d)
        rows = csr_gather_rows(adj.transpose, clips)  # (n, M_local)
        return sparse_matmul(rows, x_users, lambda: csr_transpose(rows))  # (n, d)
