"""Frozen clip features with their user-side sums precomputed: eq. 7 at the cost of the users.

With frozen clip features X (C, F) (the extracted ResNet features: neither
``trainable_clip_features`` nor a free clip table), H_c^(0) is an affine map of them,
e(x) = W_t (W_fc x + b) (eq. 1 and section 3.1), so the sums of eq. 7 are

    R~ H_c^(0) = ((R~ X) W_fc^T + (R~ 1) b^T) W_t^T            (row vectors)

where R~ X (M x F) and R~ 1 (M x 1) are constants, computed once per graph. A training step
then applies the FC to the M local users' sums and to the clips of its batch (eq. 10 needs
H_c^(0) of those only), instead of to all C local clips: its cost follows the users and the
batch, not the catalogue. The result is the same function, up to the order of floating-point
additions (tests/test_clip_inputs.py: forward, loss and gradients within 1e-5).

:class:`FrozenClipInputs` is passed to the model wherever the (C, F) feature tensor would be
(``FRAME.embeddings``, ``forward``, ``score_pairs``); it is an ``nn.Module`` of non-persistent
buffers, so it follows ``.to(device)`` and stays out of checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from frame_dist.model.propagation import (
    Adjacency,
    PropagationGraph,
    csr_gather_rows,
    csr_tensor,
    csr_transpose,
)

if TYPE_CHECKING:
    from frame_dist.model.frame import FRAME


class FrozenClipInputs(nn.Module):
    """Clip features (C, F) and, per graph, R~ X (M, F) and R~ 1 (M, 1).

    Build with :meth:`build`. ``clip_rows(encode, clips)`` gives H_c^(0) of some clips
    (``encode`` is the model's ``clip_input``); ``user_sums("pos" | "neg")`` the constants of
    eq. 7 for the positive or negative graph.

    Example::

        >>> inputs = FrozenClipInputs.build(clip_features, graph)
        >>> logits = model.score_pairs(inputs, graph, users, videos)   # as with clip_features
    """

    features: Tensor
    pos_sums: Tensor
    pos_degree: Tensor

    def __init__(self, features: Tensor, pos: tuple[Tensor, Tensor],
                 neg: tuple[Tensor, Tensor] | None):
        super().__init__()
        self.register_buffer("features", features, persistent=False)  # (C, F)
        self.register_buffer("pos_sums", pos[0], persistent=False)  # (M, F) R~^p X
        self.register_buffer("pos_degree", pos[1], persistent=False)  # (M, 1) R~^p 1
        self.has_negative = neg is not None
        self.register_buffer("neg_sums", None if neg is None else neg[0], persistent=False)
        self.register_buffer("neg_degree", None if neg is None else neg[1], persistent=False)

    @classmethod
    @torch.no_grad()
    def build(cls, features: Tensor, graph: PropagationGraph,
              chunk_rows: int = 4096) -> FrozenClipInputs:
        """The constants of ``graph`` (its local users and clips) for clip ``features`` (C, F),
        ``chunk_rows`` users at a time (bounded temporaries; the result is M x F)."""
        if features.ndim != 2 or features.shape[0] != graph.n_clips:
            raise ValueError(f"FrozenClipInputs: features {tuple(features.shape)} must be "
                             f"(C, F) with C = {graph.n_clips}, the graph's clips")
        features = features.float()
        pos = _user_sums(graph.pos, features, chunk_rows)
        neg = None if graph.neg is None else _user_sums(graph.neg, features, chunk_rows)
        return cls(features, pos, neg)

    @property
    def n_users(self) -> int:
        return int(self.pos_sums.shape[0])

    def user_sums(self, side: str) -> tuple[Tensor, Tensor]:
        """(R~ X (M, F), R~ 1 (M, 1)) of the positive ("pos") or negative ("neg") graph."""
        if side == "neg" and not self.has_negative:
            raise ValueError("FrozenClipInputs: built without the negative graph")
        if side == "pos":
            return self.pos_sums, self.pos_degree
        return self.neg_sums, self.neg_degree

    def clip_rows(self, encode: Callable[[Tensor], Tensor], clips: Tensor | None) -> Tensor:
        """H_c^(0) of ``clips`` (local clip indices; None: every clip): ``encode(X[clips])``."""
        return encode(self.features if clips is None else self.features[clips])


def streamed_user_sums(graph: PropagationGraph, blocks: Iterable[tuple[Tensor, Tensor]],
                       n_features: int) -> tuple[tuple[Tensor, Tensor],
                                                 tuple[Tensor, Tensor] | None]:
    """(R~ X, R~ 1) of the positive and negative graph from the clip features in blocks.

    ``blocks`` yields (local clip indices (n,), their features (n, F)), each clip once (e.g. one
    stored part at a time): memory stays at the M x F sums plus one block.
    """
    adjs = [graph.pos] + ([] if graph.neg is None else [graph.neg])
    device = graph.pos.matrix.device
    sums = [torch.zeros(graph.n_users, n_features, device=device) for _ in adjs]
    for cols, x in blocks:
        cols = cols.to(device=device, dtype=torch.long)
        x = x.to(device=device, dtype=torch.float32)
        for adj, total in zip(adjs, sums):
            t = csr_transpose(csr_gather_rows(adj.transpose, cols))  # (M, n): R~[:, cols]
            touched = torch.nonzero(t.crow_indices().diff()).squeeze(1)  # users with an edge
            total[touched] += torch.sparse.mm(csr_gather_rows(t, touched), x)
    out = [(total, _degree(adj)) for adj, total in zip(adjs, sums)]
    return out[0], (out[1] if len(out) > 1 else None)


def _degree(adj: Adjacency) -> Tensor:
    """R~ 1: (M, 1) fp32 row sums."""
    crow = adj.matrix.crow_indices()
    row = torch.repeat_interleave(torch.arange(adj.n_users, device=crow.device), crow.diff())
    degree = torch.zeros(adj.n_users, 1, device=crow.device)
    return degree.index_add_(0, row, adj.matrix.values().float()[:, None])


def _user_sums(adj: Adjacency, features: Tensor, chunk_rows: int) -> tuple[Tensor, Tensor]:
    """(R~ X, R~ 1) in fp32, a block of user rows at a time."""
    matrix = adj.matrix
    crow = matrix.crow_indices()
    sums = features.new_empty(adj.n_users, features.shape[1])
    for start in range(0, adj.n_users, chunk_rows):
        stop = min(start + chunk_rows, adj.n_users)
        lo, hi = int(crow[start]), int(crow[stop])
        block = csr_tensor(crow[start:stop + 1] - lo, matrix.col_indices()[lo:hi],
                           matrix.values()[lo:hi], (stop - start, adj.n_clips))
        sums[start:stop] = torch.sparse.mm(block, features)
    return sums, _degree(adj)


def clip_inputs_for(model: FRAME, features: Tensor | None, graph: PropagationGraph
                    ) -> Tensor | FrozenClipInputs | None:
    """What to give ``model`` as its clip input on ``graph``: :class:`FrozenClipInputs` where it
    reads frozen features and the graph has fewer users than clips (a step's FC then runs on
    M + the batch's clips instead of all C), else ``features`` unchanged."""
    frozen = model.use_visual and not model.trainable_clip_features
    if features is None or not frozen or graph.n_users >= graph.n_clips:
        return features
    return FrozenClipInputs.build(features, graph)
