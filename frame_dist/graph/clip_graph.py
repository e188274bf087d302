"""The user-clip graphs of FRAME (paper section 3.2, eqs. 2-6) and the clip labels (section 3.4).

Clip layout: video ``v`` (dense index) is cut into N_c equal clips; clip ``j`` (0-based) of video
``v`` has global clip index ``c = v * N_c + j``, so C = N * N_c.

Clip labels of one interaction with watch ratio r (see docs/model.md):

* a full watch (the ``full_watch`` flag from ingest, r >= 1 - tolerance): all N_c clips positive;
* otherwise the skip clip is s = floor(r * N_c), clamped to N_c - 1: clips j < s were fully played
  (weak positives), clip s is where the user skipped (weak negative), clips j > s were never shown
  (unlabelled).

One integer per interaction encodes this: ``watched`` = number of fully played clips, which is N_c
for a full watch and s otherwise (the skip clip is then clip ``watched``).

Graphs (eq. 4) over M users and C clips, binary with duplicates collapsed:

* R^p, ``positives="full_watch"`` (eq. 2): every clip of every fully watched video;
  ``positives="watched_clips"`` (variant): every fully played clip of any interaction;
* R^n (eq. 3): the skip clip of every interaction that is not a full watch.

Normalisation (eq. 6, with our Decision): R~ = D_u^{-1/2} R D_c^{-1/2}, degrees over the whole
graph, one normalisation per graph; zero-degree rows and columns stay zero. Partitioning slices
user rows out of the *normalised* matrices, so every shard keeps whole-graph degrees.

Only the interactions passed in enter the graph: callers pass the training split only.
Everything here is vectorised numpy/scipy/pyarrow; there is no Python loop per interaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import torch

from frame_dist.model.propagation import Adjacency, PropagationGraph, csr_tensor

Positives = Literal["full_watch", "watched_clips"]
POSITIVES: tuple[str, ...] = ("full_watch", "watched_clips")
# eq. 6: "symmetric" R~ = D_u^-1/2 R D_c^-1/2 (the paper's GCN normalisation); "user_mean"
# R~ = D_u^-1 R (a user is the mean of its clips; no clip-popularity weights; docs/model.md)
Normalisation = Literal["symmetric", "user_mean"]
NORMALISATIONS: tuple[str, ...] = ("symmetric", "user_mean")

# r * N_c is computed in float64; a watch ratio exactly at a clip boundary (r = j / N_c) must land
# in clip j even when the product rounds to j - 1e-16.
_BOUNDARY_GUARD = 1e-9


class GraphError(ValueError):
    """Bad input to graph building: names the field and the offending rows."""


def _rows(mask: np.ndarray, labels: np.ndarray | None = None, limit: int = 5) -> list[int]:
    """First offending row numbers: ``labels`` when given (e.g. source_row), else 1-based."""
    idx = np.flatnonzero(mask)[:limit]
    return [int(x) for x in (labels[idx] if labels is not None else idx + 1)]


# --------------------------------------------------------------------------- id maps


class IdMap:
    """Dense indices 0..n-1 for string ids (user_id, video_id), with vectorised look-ups.

    ``IdMap.from_values(values)`` takes the sorted distinct values, so the same data always gives
    the same indices. Look-ups go through ``pyarrow.compute.index_in`` (a hash table built once
    per call), never a Python loop.

    Example::

        >>> videos = IdMap.from_values(["b", "a", "b"], name="video_id")
        >>> videos.lookup(["a", "b"]).tolist()
        [0, 1]
    """

    def __init__(self, ids: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray,
                 name: str = "id"):
        self.name = name
        arr = _as_string_array(ids)
        if arr.null_count:
            raise GraphError(f"IdMap {name}: null id at position(s) "
                             f"{_rows(np.asarray(arr.is_null()))}")
        if pc.count_distinct(arr).as_py() != len(arr):
            counts = pc.value_counts(arr)
            dup = [v.as_py() for v, c in zip(counts.field("values"), counts.field("counts"))
                   if c.as_py() > 1][:5]
            raise GraphError(f"IdMap {name}: duplicate ids {dup}")
        self._ids = arr

    @classmethod
    def from_values(cls, values: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray,
                    name: str = "id") -> IdMap:
        """The sorted distinct non-null ``values`` as an id map."""
        arr = _as_string_array(values)
        uniq = pc.unique(pc.drop_null(arr))
        return cls(pc.take(uniq, pc.sort_indices(uniq)), name=name)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"IdMap({self.name}, n={len(self)})"

    @property
    def ids(self) -> pa.Array:
        """The ids in index order (a string array)."""
        return self._ids

    def lookup(self, values: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray,
               where: str = "input", rows: np.ndarray | None = None) -> np.ndarray:
        """Dense indices (int64) of ``values``; raise naming unknown or null ids and their rows.

        ``where`` names the data in the message; ``rows`` gives the row label of each value
        (e.g. ``source_row``), else rows are counted from 1.
        """
        arr = _as_string_array(values)
        idx = pc.index_in(arr, value_set=self._ids)
        missing = np.asarray(idx.is_null())
        if missing.any():
            null_in = np.asarray(arr.is_null())
            if null_in.any():
                raise GraphError(f"{where}: null {self.name} at rows {_rows(null_in, rows)}")
            unknown = pc.unique(pc.filter(arr, pa.array(missing))).to_pylist()
            raise GraphError(f"{where}: {int(missing.sum())} row(s) with a {self.name} not in "
                             f"the id map ({len(self)} ids), e.g. {unknown[:5]} at rows "
                             f"{_rows(missing, rows)}")
        return np.asarray(idx.fill_null(0), dtype=np.int64)

    def decode(self, indices: np.ndarray) -> pa.Array:
        """The ids of dense ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        bad = (indices < 0) | (indices >= len(self))
        if bad.any():
            raise GraphError(f"IdMap {self.name}: indices {indices[bad][:5].tolist()} out of "
                             f"range [0, {len(self)})")
        return pc.take(self._ids, pa.array(indices))


def _as_string_array(values: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(np.asarray(values, dtype=object) if isinstance(values, np.ndarray)
                          else list(values), type=pa.string())
    if pa.types.is_large_string(values.type) or pa.types.is_dictionary(values.type):
        values = values.cast(pa.string())
    if not pa.types.is_string(values.type):
        raise GraphError(f"ids must be strings, got {values.type}")
    return values


# --------------------------------------------------------------------------- interactions


@dataclass
class Interactions:
    """Interactions as dense index arrays (one entry per interaction)."""

    user_idx: np.ndarray  # (n,) int64 dense user index
    video_idx: np.ndarray  # (n,) int64 dense video index
    watch_ratio: np.ndarray  # (n,) float64 r
    full_watch: np.ndarray  # (n,) bool
    source_row: np.ndarray | None = None  # (n,) int64 row labels for error messages

    def __len__(self) -> int:
        return len(self.user_idx)


def encode_interactions(table: pa.Table, users: IdMap, videos: IdMap,
                        split: str | None = "train", where: str = "interactions") -> Interactions:
    """Dense arrays of an interactions table (schemas.INTERACTIONS), keeping one ``split``.

    ``split=None`` keeps every row. Unknown user or video ids raise, naming their ``source_row``.
    """
    need = ["user_id", "video_id", "watch_ratio", "full_watch"]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise GraphError(f"{where}: missing column(s) {missing}; has {table.column_names}")
    if split is not None:
        if "split" not in table.column_names:
            raise GraphError(f"{where}: no 'split' column to select split={split!r}")
        table = table.filter(pc.equal(table["split"], split))
    rows = (np.asarray(table["source_row"], dtype=np.int64)
            if "source_row" in table.column_names else None)
    return Interactions(
        user_idx=users.lookup(table["user_id"], where, rows),
        video_idx=videos.lookup(table["video_id"], where, rows),
        watch_ratio=np.asarray(table["watch_ratio"].to_numpy(zero_copy_only=False),
                               dtype=np.float64),
        full_watch=np.asarray(table["full_watch"].to_numpy(zero_copy_only=False), dtype=bool),
        source_row=rows,
    )


def clip_labels(watch_ratio: np.ndarray, full_watch: np.ndarray, n_clips: int,
                rows: np.ndarray | None = None) -> np.ndarray:
    """``watched`` per interaction: N_c for a full watch, else the skip clip s (section 3.4).

    s = floor(r * N_c) clamped to [0, N_c - 1]; clips j < s are weak positives, clip s the weak
    negative, clips j > s unlabelled. Raises on NaN, infinite or negative ratios.
    """
    if n_clips <= 0:
        raise GraphError(f"n_clips={n_clips} must be > 0")
    r = np.asarray(watch_ratio, dtype=np.float64)
    full = np.asarray(full_watch, dtype=bool)
    if r.shape != full.shape or r.ndim != 1:
        raise GraphError(f"watch_ratio {r.shape} and full_watch {full.shape} must be equal-length "
                         "1-d arrays")
    bad = ~np.isfinite(r) | (r < 0)
    if bad.any():
        raise GraphError(f"watch_ratio must be finite and >= 0: {int(bad.sum())} bad row(s), "
                         f"e.g. rows {_rows(bad, rows)} with values {r[bad][:5].tolist()}")
    skip = np.clip(np.floor(r * n_clips + _BOUNDARY_GUARD), 0, n_clips - 1).astype(np.int64)
    return np.where(full, np.int64(n_clips), skip)


# --------------------------------------------------------------------------- graphs


@dataclass
class UserClipGraph:
    """R^p, R^n (binary) and R~^p, R~^n (normalised, eq. 6) for a set of user rows.

    For the whole graph ``user_rows`` is ``arange(n_users)``; a shard from :func:`slice_users`
    holds a subset of rows, normalised with the whole graph's degrees.
    """

    n_users: int  # M of the whole graph
    n_videos: int  # N
    clips_per_video: int  # N_c
    positives: str  # "full_watch" (eq. 2) or "watched_clips"
    user_rows: np.ndarray  # (M_local,) global user index of each row
    pos: sp.csr_matrix  # R^p (M_local, C) float32 0/1
    neg: sp.csr_matrix  # R^n (M_local, C) float32 0/1
    pos_norm: sp.csr_matrix  # R~^p (M_local, C) float32
    neg_norm: sp.csr_matrix  # R~^n (M_local, C) float32
    meta: dict = field(default_factory=dict)

    @property
    def n_clips(self) -> int:
        """C = N * N_c."""
        return self.n_videos * self.clips_per_video

    def summary(self) -> dict:
        """Sizes for logs and the memory planner."""
        return dict(n_users=self.n_users, n_local_users=int(len(self.user_rows)),
                    n_videos=self.n_videos, clips_per_video=self.clips_per_video,
                    n_clips=self.n_clips, positives=self.positives,
                    nnz_pos=int(self.pos.nnz), nnz_neg=int(self.neg.nnz))


def _binary_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    mat = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    mat.sum_duplicates()
    mat.data[:] = 1.0  # duplicates collapse to a single edge
    return mat


def normalise(matrix: sp.csr_matrix, mode: Normalisation = "symmetric") -> sp.csr_matrix:
    """R~ of eq. 6, zero-degree rows/columns left at zero.

    ``"symmetric"``: R~ = D_u^{-1/2} R D_c^{-1/2}; ``"user_mean"``: R~ = D_u^{-1} R (row i
    averages user i's clips). Degrees are the row and column sums of ``matrix`` (the number of
    edges for a binary R).
    """
    if mode not in NORMALISATIONS:
        raise GraphError(f"normalisation={mode!r} must be one of {list(NORMALISATIONS)}")
    m = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    m.sum_duplicates()
    deg_u = np.asarray(m.sum(axis=1)).ravel()  # (M,)
    deg_c = np.asarray(m.sum(axis=0)).ravel()  # (C,)
    inv_u = np.zeros_like(deg_u)
    inv_c = np.zeros_like(deg_c)
    if mode == "symmetric":
        np.divide(1.0, np.sqrt(deg_u), out=inv_u, where=deg_u > 0)
        np.divide(1.0, np.sqrt(deg_c), out=inv_c, where=deg_c > 0)
    else:
        np.divide(1.0, deg_u, out=inv_u, where=deg_u > 0)
        inv_c[:] = 1.0
    row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))  # (nnz,)
    m.data = m.data * inv_u[row] * inv_c[m.indices]
    return m.astype(np.float32)


def build_graph(user_idx: np.ndarray, video_idx: np.ndarray, watch_ratio: np.ndarray,
                full_watch: np.ndarray, *, n_users: int, n_videos: int, n_clips: int,
                positives: Positives = "full_watch",
                normalisation: Normalisation = "symmetric") -> UserClipGraph:
    """Build R^p, R^n and their normalised forms from *training* interactions (eqs. 2-6).

    Args:
        user_idx, video_idx: (n,) dense indices in [0, n_users) and [0, n_videos).
        watch_ratio: (n,) r; full_watch: (n,) the full-watch flag from ingest.
        n_users, n_videos: M and N (the index spaces, including users/videos without edges).
        n_clips: N_c, clips per video.
        positives: "full_watch" (eq. 2) or "watched_clips" (every fully played clip).
        normalisation: eq. 6's R~, "symmetric" or "user_mean" (:func:`normalise`).
    """
    if positives not in POSITIVES:
        raise GraphError(f"positives={positives!r} must be one of {list(POSITIVES)}")
    if n_users <= 0 or n_videos <= 0:
        raise GraphError(f"n_users={n_users} and n_videos={n_videos} must be > 0")
    u = np.asarray(user_idx)
    v = np.asarray(video_idx)
    n = len(u)
    for name, arr in (("video_idx", v), ("watch_ratio", watch_ratio), ("full_watch", full_watch)):
        if np.shape(arr) != (n,):
            raise GraphError(f"{name} has shape {np.shape(arr)}, user_idx has ({n},)")
    for name, arr, hi in (("user_idx", u, n_users), ("video_idx", v, n_videos)):
        if n and not np.issubdtype(arr.dtype, np.integer):
            raise GraphError(f"{name} must be integers, got {arr.dtype}")
        bad = (arr < 0) | (arr >= hi)
        if bad.any():
            raise GraphError(f"{name} out of range [0, {hi}) at rows {_rows(bad)}: "
                             f"{arr[bad][:5].tolist()}")
    u = u.astype(np.int64)
    v = v.astype(np.int64)
    watched = clip_labels(watch_ratio, full_watch, n_clips)  # (n,)
    shape = (n_users, n_videos * n_clips)

    # positive edges: a run of `count` clips starting at clip 0 of the video, per interaction
    count = (np.where(watched == n_clips, n_clips, 0) if positives == "full_watch"
             else watched)  # (n,)
    total = int(count.sum())
    first = np.repeat(np.cumsum(count) - count, count)  # (total,) offset of each run
    offset_in_run = np.arange(total, dtype=np.int64) - first
    pos_rows = np.repeat(u, count)
    pos_cols = np.repeat(v * n_clips, count) + offset_in_run
    # negative edges: the skip clip of every non-full interaction
    skipped = watched < n_clips
    neg_rows = u[skipped]
    neg_cols = v[skipped] * n_clips + watched[skipped]

    pos = _binary_csr(pos_rows, pos_cols, shape)
    neg = _binary_csr(neg_rows, neg_cols, shape)
    return UserClipGraph(n_users=n_users, n_videos=n_videos, clips_per_video=n_clips,
                         positives=positives, user_rows=np.arange(n_users, dtype=np.int64),
                         pos=pos, neg=neg, pos_norm=normalise(pos, normalisation),
                         neg_norm=normalise(neg, normalisation))


def slice_users(graph: UserClipGraph, users: np.ndarray) -> UserClipGraph:
    """The rows of ``users`` (indices into ``graph``'s rows), keeping whole-graph normalisation.

    Used to partition the graph: a shard's R~ rows equal the whole graph's R~ rows exactly.
    """
    users = np.asarray(users, dtype=np.int64)
    bad = (users < 0) | (users >= len(graph.user_rows))
    if bad.any():
        raise GraphError(f"slice_users: rows {users[bad][:5].tolist()} out of range "
                         f"[0, {len(graph.user_rows)})")
    return UserClipGraph(n_users=graph.n_users, n_videos=graph.n_videos,
                         clips_per_video=graph.clips_per_video, positives=graph.positives,
                         user_rows=graph.user_rows[users], pos=graph.pos[users],
                         neg=graph.neg[users], pos_norm=graph.pos_norm[users],
                         neg_norm=graph.neg_norm[users], meta=dict(graph.meta))


# --------------------------------------------------------------------------- to torch


def csr_to_torch(matrix: sp.spmatrix, device: torch.device | str | None = None) -> torch.Tensor:
    """A scipy sparse matrix as a float32 torch sparse CSR tensor (int64 indices)."""
    m = sp.csr_matrix(matrix, dtype=np.float32)
    m.sum_duplicates()
    m.sort_indices()
    t = csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                   torch.from_numpy(m.indices.astype(np.int64)),
                   torch.from_numpy(np.ascontiguousarray(m.data)), m.shape)
    return t if device is None else t.to(device)


def csr_to_coo_torch(matrix: sp.spmatrix, device: torch.device | str | None = None
                     ) -> torch.Tensor:
    """A scipy sparse matrix as a coalesced float32 torch sparse COO tensor."""
    m = sp.coo_matrix(matrix, dtype=np.float32)
    idx = torch.from_numpy(np.vstack([m.row, m.col]).astype(np.int64))
    t = torch.sparse_coo_tensor(idx, torch.from_numpy(m.data), m.shape,
                                check_invariants=False).coalesce()
    return t if device is None else t.to(device)


def adjacency(matrix: sp.spmatrix, device: torch.device | str | None = None) -> Adjacency:
    """R~ and its precomputed transpose as torch CSR (what the propagation module multiplies)."""
    return Adjacency(csr_to_torch(matrix, device), csr_to_torch(sp.csr_matrix(matrix).T, device))


def to_torch(graph: UserClipGraph, device: torch.device | str | None = None,
             with_negative: bool = True) -> PropagationGraph:
    """The normalised graphs of ``graph`` as a :class:`PropagationGraph` for the model."""
    return PropagationGraph(
        pos=adjacency(graph.pos_norm, device),
        neg=adjacency(graph.neg_norm, device) if with_negative else None,
        clips_per_video=graph.clips_per_video,
    )
