"""Stage [score]: the top-K videos of every user, with Ray Data over user chunks.

1. **Embeddings, once** (:func:`prepare_scoring`, ``frame_dist.score.embeddings.propagate_shards``).
   FRAME is rebuilt from ``<store>/runs/<train.run_name>/model.pt`` and propagated once over
   the committed graph for the run's N_c by one Ray task per shard (also for one shard), each
   holding only its shard and the clip features of its videos. A task computes its users' H_u
   (eq. 7, local) and its partial clip sums of eq. 8, which the driver adds up before W^(2),
   ReLU and eqs. 9-10: H_c (N N_c, d) in the global clip order v * N_c + j. The task also turns
   its own users into the dataset rows of step 3 (:class:`UserChunks`: Z_u of step 2 and the
   seen candidates), in objects of >= 256 KiB (``CHUNK_OBJECT_MIN_BYTES``: smaller task
   returns would be handed to the driver inline), left in the object store. The driver holds C x d
   tables and the candidates' clip side -- nothing per user, never the graph or the C x F clip
   features.

2. **Fused tables** (:func:`fuse_tables`). MLP^p([h_u; h_c]) = w_p^T ReLU(W_p [h_u; h_c] + b_p)
   + c_p (eq. 11) splits its first layer into a user part and a clip part, so with G = 2H
   hidden units (both MLPs side by side)::

       Z_u = [W_p[:, :d] h_u^p ; W_n[:, :d] h_u^n]                       (M, G)   per user
       Z_c = [W_p[:, d:] h_c + b_p ; W_n[:, d:] h_c + b_n]               (C, G)   per clip
       w   = [a_p w_p ; -a_n w_n] / N_c,   beta = a_p c_p - a_n c_n      (G,), scalar
       y(u, v) = sum_j w^T ReLU(Z_u + Z_{v,j}) + beta                    (eqs. 11-13)

   A (user, video) pair then costs, per clip, one add, one ReLU and one dot product of width G:
   8 N_c H FLOPs (our FLOP model: 2 N_c H x (1 add + 1 ReLU + 2 for the multiply-add)) instead
   of the (2d x H) matrix product per clip and MLP of the model's own forward. The clip side is
   stored as thresholds T_c = -Z_c, because ReLU(z - t) = max(z, t) - t lets the eager kernel
   do one broadcast ``maximum`` and one matrix-vector product per tile (two passes over the
   tile instead of three); the compiled kernel fuses ReLU(z - t) . w into one loop.

3. **Ray Data over user chunks** (:func:`run_scoring`). Each shard's users (in the shard's
   order) are cut into chunks of ``score.users_per_chunk``; chunks are numbered shard after
   shard (:attr:`ScoringPlan.first_chunk`, known from the graph manifest before any
   propagation). The dataset (``ray.data.from_arrow_refs`` over the shard tasks' objects) has
   one row per chunk still to score, carrying that chunk's user ids, its rows of Z_u and its
   seen (user, candidate) pairs; the clip side (T_c, w, beta, the candidate ids) is put in the
   object store once and every actor of a pool of :class:`ScoreChunks` (GPU actors when the
   cluster has GPUs) gets it once in ``__init__``. An actor scores its chunk in blocks of
   videos (a running ``torch.topk`` merge per block; each block in cache-sized tiles), writes
   the chunk's top-K rows as one staged part file of the ``scores`` table itself and returns
   only the part's name. Actor memory: the clip side plus users_per_chunk x (K +
   videos_per_block) scores plus one tile, independent of the number of users. The driver
   receives only part names.

4. **Commit and resume.** The driver commits parts as they arrive (at most every
   ``COMMIT_MIN_INTERVAL_S``), manifest last; every part's meta lists its chunk ids. The
   manifest metadata records the run identity (run name, model.pt SHA-256, graph fingerprint,
   N_c, top_k, exclude_seen, candidates, users_per_chunk). A rerun with the same identity scores
   only the chunks not yet committed (:func:`plan_scoring` reads the identity before any
   propagation, so a finished table is skipped at once); a rerun with another
   identity starts over, and its first commit *replaces* the old parts, so two result sets are
   never mixed. Parts staged by a killed run and never committed stay invisible (orphans,
   removed by ``Table.vacuum``). A chunk arriving twice (a retried task) is committed once.

Defined results at the edges: **cold users** (in the graph but without training interactions,
e.g. only validation / test rows) have no edge in R~^p or R~^n, so H_u^p = H_u^n = ReLU(0) = 0
and Z_u = 0: their ranking is the clip side's alone (the same list for every cold user), and
they still get K rows. Users absent from the graph (none of their interactions has frame
features) are not scored. Videos of the graph without any interaction have H_c = alpha_0
H_c^(0) (no neighbours) and are scored from their visual embedding. With fewer than K
candidates left (after the exclusion of seen videos) a user gets all of them, fewer than K rows
(no row at all when a candidate list holds only videos the user has seen).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from feature_store.schemas import SCORES
from feature_store.store import Part, Store, StoreError, open_filesystem
from frame_dist.config import Config, ConfigError
from frame_dist.graph.clip_graph import GraphError, IdMap
from frame_dist.graph.shards import read_graph_manifest
from frame_dist.model.frame import FRAME
from frame_dist.score.embeddings import ShardUsers, propagate_shards, rebuild_model

SCORES_TABLE = "scores"
FAULT_ENV = "FRAME_DIST_FAULT_KILL_AFTER_COMMITS"  # tests: SIGKILL the driver after n commits
COMMIT_MIN_INTERVAL_S = 2.0  # bounds manifest rewrites; a kill loses at most this much work
VIDEOS_PER_BLOCK = 4096  # videos scored between two top-k merges: (U, block) scores in memory
TILE_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 26}  # elements of one eager tile (U_t, V_t, N_c, G)
COMPILED_TILE = (128, 64)  # (users, clips) of the compiled kernel's fixed tile shape
# "auto" compiles the CPU kernel only when an actor's work would take well over the compile time
# (5-60 s) with the eager kernel (~1e9 tile elements/s on one core: 2e11 is ~3 min)
AUTO_COMPILE_MIN_ELEMENTS = 2e11
KERNELS = ("auto", "eager", "compiled")
# the shard tasks yield chunk rows in objects of at least this size: Ray returns a task's smaller
# objects inline to their owner, the driver (max_direct_call_object_size, 100 KiB), instead of
# keeping them in the object store
CHUNK_OBJECT_MIN_BYTES = 256 * 1024


class ScoreError(RuntimeError):
    """Scoring cannot run (bad candidates, inconsistent graph) or did not finish."""


# --------------------------------------------------------------------------- fused tables


@dataclass
class ClipSide:
    """The clip half of the fused scoring function, shared by every scoring actor."""

    clip_thresholds: Tensor  # (V, N_c, G) T_c = -Z_c of each candidate's clips
    out_weight: Tensor  # (G,) w = [a_p w_p ; -a_n w_n] / N_c
    out_bias: float  # beta = a_p c_p - a_n c_n


@dataclass
class FusedTables(ClipSide):
    """The model's scoring function split into a user side and a clip side (module docstring)."""

    user_table: Tensor  # (M, G) Z_u


def _sides(model: FRAME, h_u_pos: Tensor | None, h_u_neg: Tensor | None) -> list[tuple]:
    """(MLP, H_u, signed output weight) of the positive side and, if used, the negative side."""
    sides = [(model.mlp_pos, h_u_pos, model.a_pos)]
    if model.use_negative:
        sides.append((model.mlp_neg, h_u_neg, -model.a_neg))
    return sides


@torch.no_grad()
def fuse_users(model: FRAME, h_u_pos: Tensor, h_u_neg: Tensor | None) -> Tensor:
    """Z_u = [W_p[:, :d] h_u^p ; W_n[:, :d] h_u^n]: (M, G) from (M, d) each."""
    if model.use_negative and h_u_neg is None:
        raise ValueError("fuse_users: the model uses the negative side but h_u_neg is None")
    # the same product the model adds (PreferenceMLP.forward), so Z_u + Z_c is its z
    return torch.cat([torch.nn.functional.linear(h_u, mlp.hidden.weight[:, :model.dim])
                      for mlp, h_u, _ in _sides(model, h_u_pos, h_u_neg)], -1).contiguous()


@torch.no_grad()
def fuse_clips(model: FRAME, h_c: Tensor, clips_per_video: int,
               videos: Tensor | None = None) -> ClipSide:
    """T_c, w and beta of the clips of ``videos`` (default: all); ``h_c`` (N N_c, d) in clip
    order v * N_c + j."""
    d, n_c = model.dim, clips_per_video
    h_c_video = h_c.view(-1, n_c, d)  # (N, N_c, d)
    if videos is not None:
        h_c_video = h_c_video[videos]  # (V, N_c, d)
    clip_parts, weights, bias = [], [], 0.0
    for mlp, _, scale in _sides(model, None, None):
        clip_parts.append(torch.nn.functional.linear(h_c_video, mlp.hidden.weight[:, d:],
                                                     mlp.hidden.bias))  # (V, N_c, H)
        weights.append(scale * mlp.out.weight[0] / n_c)  # (H,)
        bias += scale * float(mlp.out.bias[0])
    return ClipSide((-torch.cat(clip_parts, -1)).contiguous(), torch.cat(weights).contiguous(),
                    bias)


def fuse_tables(model: FRAME, h_c: Tensor, h_u_pos: Tensor, h_u_neg: Tensor | None,
                clips_per_video: int, videos: Tensor | None = None) -> FusedTables:
    """Z_u of every user and T_c, w, beta of the clips of ``videos`` (default: all)."""
    clip = fuse_clips(model, h_c, clips_per_video, videos)
    return FusedTables(clip.clip_thresholds, clip.out_weight, clip.out_bias,
                       fuse_users(model, h_u_pos, h_u_neg))


# --------------------------------------------------------------------------- scoring kernel


def _tile_scores(z_u: Tensor, t_c: Tensor, w: Tensor, fold: int = 1) -> Tensor:
    """sum_j w^T ReLU(z_u - t_{v,j}): (U_t, G), (V_t, N_c, G), (G,) -> (U_t, V_t).

    ``fold`` (dividing G) adds the G / fold-wide slices of ReLU(.) * w before the reduction:
    the same sum, but the compiled loop then carries ``fold`` independent products per
    accumulator update instead of one (a 1.3-2x faster loop on AVX-512: the reduction's
    dependency chain, not arithmetic, bounds the plain form).
    """
    x = torch.relu(z_u[:, None, None, :] - t_c[None]) * w  # (U_t, V_t, N_c, G)
    width = x.shape[-1] // fold
    y = x[..., :width]
    for i in range(1, fold):  # unrolled when traced: fold <= 4
        y = y + x[..., i * width:(i + 1) * width]  # (U_t, V_t, N_c, G / fold)
    return y.sum(-1).sum(-1)  # (U_t, V_t)


class FusedScorer:
    """y(u, v) (eq. 13) of user rows against every candidate video, and their top-k.

    Holds the clip side on its device. ``kernel="eager"``: per tile, one broadcast ``maximum``
    into a reused buffer (U_t, V_t, N_c, G) and one matrix-vector product, as
    ReLU(z - t) = max(z, t) - t (the ``- t`` part is a per-video constant). ``"compiled"``:
    :func:`_tile_scores` through ``torch.compile`` (one fused loop, the tile never in memory) at
    one fixed tile shape, inputs zero-padded to whole tiles; if compilation fails the scorer
    warns and falls back to eager.

    Example::

        >>> tables = fuse_tables(model, h_c, h_u_pos, h_u_neg, clips_per_video=4)
        >>> scorer = FusedScorer(tables.clip_thresholds, tables.out_weight, tables.out_bias)
        >>> values, videos = scorer.top_k(tables.user_table[:1024], k=10)   # (1024, 10) each
    """

    def __init__(self, clip_thresholds: Tensor, out_weight: Tensor, out_bias: float, *,
                 kernel: str = "eager", device: torch.device | str = "cpu",
                 videos_per_block: int = VIDEOS_PER_BLOCK):
        if kernel not in ("eager", "compiled"):
            raise ValueError(f"FusedScorer: kernel={kernel!r} must be 'eager' or 'compiled'")
        if clip_thresholds.ndim != 3 or out_weight.shape != clip_thresholds.shape[-1:]:
            raise ValueError(f"FusedScorer: clip thresholds {tuple(clip_thresholds.shape)} must "
                             f"be (V, N_c, G) and the weight (G,), got {tuple(out_weight.shape)}")
        self.device = torch.device(device)
        self.videos_per_block = max(1, int(videos_per_block))
        self.t_c = clip_thresholds.to(self.device, torch.float32)  # (V, N_c, G)
        self.w = out_weight.to(self.device, torch.float32)  # (G,)
        self.beta = float(out_bias)
        self.n_videos, self.n_clips, self.width = self.t_c.shape
        self._buffer: Tensor | None = None
        self.kernel = kernel
        if kernel == "compiled":
            users, clips = COMPILED_TILE
            self.user_tile, self.video_tile = users, max(1, clips // self.n_clips)
            pad = -self.n_videos % self.video_tile
            self._t_padded = torch.cat([self.t_c, self.t_c.new_zeros(
                pad, self.n_clips, self.width)]) if pad else self.t_c  # (V + pad, N_c, G)
            self._fold = next(f for f in (4, 2, 1) if self.width % f == 0)
            self._compiled = torch.compile(_tile_scores, dynamic=False, fullgraph=True)
            # blocks of whole tiles: no tile is computed twice
            self.videos_per_block = -(-self.videos_per_block // self.video_tile) * self.video_tile
        else:
            self._use_eager()

    def _use_eager(self) -> None:
        self.kernel = "eager"
        # beta and the "- t" half of max(z, t) - t, summed over each video's clips
        self.video_offset = self.beta - (self.t_c @ self.w).sum(-1)  # (V,)
        per_user_video = self.n_clips * self.width
        budget = TILE_ELEMENTS["cuda" if self.device.type == "cuda" else "cpu"]
        self.video_tile = max(1, min(self.n_videos, budget // (16 * per_user_video)))
        self.user_tile = max(1, budget // (self.video_tile * per_user_video))

    def scores(self, user_table: Tensor, first: int = 0, stop: int | None = None) -> Tensor:
        """y(u, v) for the rows of ``user_table`` (U, G) and videos first..stop-1: (U, V')."""
        stop = self.n_videos if stop is None else stop
        z_u = user_table.to(self.device, torch.float32)
        if self.kernel == "compiled":
            try:
                return self._compiled_scores(z_u, first, stop)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to eager
                warnings.warn(f"score: the compiled kernel failed ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); using the eager kernel", stacklevel=2)
                self._use_eager()
        return self._eager_scores(z_u, first, stop)

    def _eager_scores(self, z_u: Tensor, first: int, stop: int) -> Tensor:
        n_users, n_c, g = z_u.shape[0], self.n_clips, self.width
        out = torch.empty(n_users, stop - first, device=self.device)  # (U, V')
        size = self.user_tile * self.video_tile * n_c * g
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = torch.empty(size, device=self.device)  # reused: no page faults
        for i in range(0, n_users, self.user_tile):  # tiles, never single users or pairs
            z = z_u[i:i + self.user_tile, None, None, :]  # (U_t, 1, 1, G)
            for j in range(first, stop, self.video_tile):
                t = self.t_c[None, j:min(j + self.video_tile, stop)]  # (1, V_t, N_c, G)
                shape = (z.shape[0], t.shape[1], n_c, g)
                tile = self._buffer[:math.prod(shape)].view(shape)
                torch.maximum(z, t, out=tile)  # (U_t, V_t, N_c, G)
                out[i:i + z.shape[0], j - first:j - first + t.shape[1]] = (
                    (tile @ self.w).sum(-1))  # (U_t, V_t)
        out += self.video_offset[first:stop]
        return out

    def _compiled_scores(self, z_u: Tensor, first: int, stop: int) -> Tensor:
        ut, vt = self.user_tile, self.video_tile
        n_users = z_u.shape[0]
        if n_users % ut:
            z_u = torch.cat([z_u, z_u.new_zeros(-n_users % ut, self.width)])  # whole tiles
        start = first - first % vt  # tiles of the padded clip table
        end = min(stop + -stop % vt, self._t_padded.shape[0])
        out = torch.empty(z_u.shape[0], end - start, device=self.device)  # (U + pad, V'')
        for i in range(0, z_u.shape[0], ut):
            for j in range(start, end, vt):
                out[i:i + ut, j - start:j - start + vt] = self._compiled(
                    z_u[i:i + ut], self._t_padded[j:j + vt], self.w, self._fold)  # (U_t, V_t)
        return out[:n_users, first - start:stop - start] + self.beta  # (U, V')

    def top_k(self, user_table: Tensor, k: int, seen: tuple[Tensor, Tensor] | None = None
              ) -> tuple[Tensor, Tensor]:
        """Top-k candidate positions of each user row: (values (U, k'), positions (U, k')).

        k' = min(k, V). ``seen`` = (rows, positions): pairs excluded (score -inf); entries of
        value -inf are not recommendations (fewer than k candidates left). Sorted descending.
        """
        n_users = user_table.shape[0]
        k = min(k, self.n_videos)
        best = torch.full((n_users, 0), -math.inf, device=self.device)  # (U, <=k)
        best_pos = torch.zeros((n_users, 0), dtype=torch.long, device=self.device)
        if seen is not None:
            seen_rows = seen[0].to(self.device, torch.long)
            seen_pos = seen[1].to(self.device, torch.long)
        for first in range(0, self.n_videos, self.videos_per_block):
            stop = min(first + self.videos_per_block, self.n_videos)
            block = self.scores(user_table, first, stop)  # (U, V_b)
            if seen is not None:
                m = (seen_pos >= first) & (seen_pos < stop)
                block[seen_rows[m], seen_pos[m] - first] = -math.inf
            positions = torch.arange(first, stop, device=self.device).expand(n_users, -1)
            values = torch.cat([best, block], 1)  # (U, k' + V_b)
            top = torch.topk(values, min(k, values.shape[1]), dim=1)
            best = top.values
            best_pos = torch.gather(torch.cat([best_pos, positions], 1), 1, top.indices)
        return best, best_pos

# --------------------------------------------------------------------------- driver: inputs


@dataclass
class ScoringInputs:
    """What the driver hands the scoring actors (:func:`prepare_scoring`): nothing per user."""

    clip_side: ClipSide  # T_c of every candidate, w, beta
    video_ids: pa.Array  # (V,) string, the candidates in global video order
    user_chunks: list[Any]  # ObjectRefs of CHUNK_SCHEMA tables: the chunks still to score
    identity: dict[str, Any]  # what makes two result sets comparable (module docstring)
    n_users: int  # M, users of the graph
    cold_users: int  # users without any training interaction (H_u = 0)
    n_chunks: int  # every chunk of the run (scored or not)
    shard_tasks: int = 0  # Ray tasks that computed the embeddings
    bytes_from_tasks: int = 0  # what the shard tasks sent the driver (the clip side only)


def read_candidates(path: str, store: Store, videos: IdMap) -> np.ndarray:
    """Sorted distinct global video indices of a candidate table (Parquet or CSV, video_id)."""
    import pyarrow.csv
    import pyarrow.parquet as pq

    fs, local = open_filesystem(path, store.endpoint_url, store.region)
    if not fs.exists(local):
        raise ConfigError(f"score.candidates={path!r}: no such file")
    try:
        if local.endswith(".csv"):
            with fs.open(local, "rb") as f:
                table = pyarrow.csv.read_csv(f, convert_options=pyarrow.csv.ConvertOptions(
                    column_types={"video_id": pa.string()}))
        else:
            table = pq.read_table(local, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"score.candidates={path!r}: not a readable Parquet or CSV file: "
                          f"{exc}") from exc
    if "video_id" not in table.column_names:
        raise ConfigError(f"score.candidates={path!r}: no video_id column (has "
                          f"{table.column_names})")
    ids = pc.unique(pc.drop_null(table["video_id"].cast(pa.string())))
    if len(ids) == 0:
        raise ScoreError(f"score.candidates={path!r} lists no video")
    try:
        return np.unique(videos.lookup(ids, where=f"score.candidates={path!r}"))
    except GraphError as exc:
        raise ScoreError(f"{exc} (candidates must be videos of the graph, i.e. with frame "
                         "features)") from exc


@dataclass
class ScoringPlan:
    """What a run will score, known before any propagation: enough to skip or resume."""

    identity: dict[str, Any]  # run name, model.pt SHA-256, graph, N_c, K, exclusion, candidates
    saved: dict[str, Any]  # model.pt: model_args, state_dict, config
    manifest: dict[str, Any]  # the graph manifest of the run's N_c
    candidates: np.ndarray  # (V,) sorted global video indices
    first_chunk: list[int]  # (P + 1,) chunk id of each shard's first chunk; the last: n_chunks

    @property
    def n_chunks(self) -> int:
        return self.first_chunk[-1]


def plan_scoring(cfg: Config, store: Store) -> ScoringPlan:
    """Read model.pt, the graph manifest and the candidates; refuse what is missing."""
    s, run = cfg.score, cfg.train.run_name
    path = f"runs/{run}/model.pt"
    if not store.exists(path):
        raise StoreError(f"no trained model at {store.uri(path)}: run the train stage first "
                         f"(train.run_name={run})")
    data = store.read_bytes(path)
    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    n_clips = saved["config"]["graph"]["n_clips"]
    manifest = read_graph_manifest(store, n_clips)
    if manifest is None:
        raise StoreError(f"no committed graph for N_c={n_clips} (run {run}) in "
                         f"{store.uri('graphs')}: run the graph stage first")
    if s.candidates:
        video_map = IdMap(manifest["video_ids"], name="video_id")
        candidates = read_candidates(s.candidates, store, video_map)
        candidate_identity: Any = {"path": s.candidates, "sha256": hashlib.sha256(
            "\n".join(video_map.decode(candidates).to_pylist()).encode()).hexdigest()}
    else:
        candidates = np.arange(manifest["n_videos"])
        candidate_identity = "all"
    identity = {
        "run": run,
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "graph": manifest["fingerprint"],
        "n_clips": n_clips,
        "top_k": s.top_k,
        "exclude_seen": s.exclude_seen,
        "candidates": candidate_identity,
        "users_per_chunk": s.users_per_chunk,  # defines the chunk ids (with the graph)
    }
    # chunk (k, b): users b * U .. (b + 1) * U - 1 of shard k, numbered shard after shard
    per_shard = [-(-shard["users"] // s.users_per_chunk) for shard in manifest["shards"]]
    return ScoringPlan(identity, saved, manifest, candidates,
                       first_chunk=np.concatenate([[0], np.cumsum(per_shard)]).tolist())


@dataclass
class UserChunks:
    """The user side of a shard's embedding task (``embeddings.propagate_shards``): its users'
    chunk rows (CHUNK_SCHEMA), made inside the task and left in the object store.

    Z_u (one (M_k, d) x (d, G) product) and the seen candidates come from the shard's own rows,
    so no user's data passes through the driver. Picklable: it travels with each task.
    """

    users_per_chunk: int
    first_chunk: list[int]  # (P + 1,) ScoringPlan.first_chunk
    todo: np.ndarray  # sorted chunk ids still to score
    candidate_of_video: np.ndarray | None  # (N,) candidate position of each video, -1: none;
    # None: seen videos are not excluded

    def __call__(self, model: FRAME, users: ShardUsers) -> Iterator[pa.Table]:
        z_u = fuse_users(model, users.h_u_pos, users.h_u_neg)  # (M_k, G)
        if not torch.isfinite(z_u).all():
            raise ScoreError(f"graph shard {users.index}: non-finite values in the fused user "
                             "table (diverged weights?)")
        seen = None
        if self.candidate_of_video is not None:
            position = self.candidate_of_video[users.train_videos]  # (n_k,)
            keep = position >= 0
            seen = (users.train_rows[keep], position[keep])
        yield from chunk_tables(users.user_ids.to_pylist(), z_u.numpy(), seen,
                                self.users_per_chunk, self.first_chunk[users.index], self.todo,
                                min_bytes=CHUNK_OBJECT_MIN_BYTES)


@torch.inference_mode()
def prepare_scoring(cfg: Config, store: Store, plan: ScoringPlan | None = None,
                    done: set[int] | frozenset[int] = frozenset()) -> ScoringInputs:
    """Rebuild the run's model, propagate once (one Ray task per shard), fuse the clip side.

    The shard tasks turn their users into the chunk rows of the chunks not in ``done``
    (:class:`UserChunks`); the driver keeps only references to them (module doc).
    """
    plan = plan if plan is not None else plan_scoring(cfg, store)
    model = rebuild_model(plan.saved)
    n_clips = plan.identity["n_clips"]
    candidates = plan.candidates
    candidate_of_video = None
    if cfg.score.exclude_seen:
        candidate_of_video = np.full(plan.manifest["n_videos"], -1, dtype=np.int64)
        candidate_of_video[candidates] = np.arange(len(candidates))
    todo = np.array(sorted(set(range(plan.n_chunks)) - set(done)), dtype=np.int64)
    user_side = UserChunks(cfg.score.users_per_chunk, plan.first_chunk, todo,
                           candidate_of_video)
    whole = propagate_shards(model, store, n_clips, user_side, cfg.score.shard_task_cpus)
    if whole.manifest["fingerprint"] != plan.identity["graph"]:
        raise ScoreError(f"the graph for N_c={n_clips} was rebuilt while scoring started")
    clip_side = fuse_clips(model, whole.h_c, n_clips, torch.from_numpy(candidates))
    for name in ("clip_thresholds", "out_weight"):
        if not torch.isfinite(getattr(clip_side, name)).all():
            raise ScoreError(f"run {cfg.train.run_name}: non-finite values in the fused "
                             f"{name} (diverged weights?)")
    refs = [ref for shard in whole.user_refs for ref in shard]  # the chunks to score
    video_ids = pa.array(whole.manifest["video_ids"], pa.string())
    return ScoringInputs(clip_side, pc.take(video_ids, pa.array(candidates)), refs,
                         plan.identity, n_users=whole.manifest["n_users"],
                         cold_users=whole.cold_users, n_chunks=plan.n_chunks,
                         shard_tasks=whole.tasks, bytes_from_tasks=whole.bytes_from_tasks)


# --------------------------------------------------------------------------- Ray Data actors

CHUNK_SCHEMA = pa.schema([
    pa.field("chunk", pa.int64()),
    pa.field("user_ids", pa.list_(pa.string())),
    pa.field("user_table", pa.large_binary()),  # (U, G) float32 rows of Z_u
    pa.field("seen_rows", pa.large_binary()),  # (n,) int64 chunk row of every seen pair
    pa.field("seen_positions", pa.large_binary()),  # (n,) int64 candidate position
])
PART_SCHEMA = pa.schema([
    pa.field("chunk", pa.int64()),
    pa.field("part_path", pa.string()),
    pa.field("part_rows", pa.int64()),
    pa.field("part_meta", pa.string()),  # JSON
])


def chunk_tables(user_ids: list[str], z_u: np.ndarray,
                 seen: tuple[np.ndarray, np.ndarray] | None, users_per_chunk: int,
                 first_chunk: int = 0, todo: np.ndarray | None = None,
                 min_bytes: int = 0) -> Iterator[pa.Table]:
    """Dataset rows (CHUNK_SCHEMA) of consecutive users: chunk ``first_chunk + b`` holds users
    b * U .. (b + 1) * U - 1; only the chunks in ``todo`` (default: all).

    ``z_u`` (n, G) their Z_u rows; ``seen`` = (row, candidate position) of the pairs to exclude.
    Yields tables of consecutive chunk rows, each of at least ``min_bytes`` (0: one row each)
    except the last.
    """
    rows = positions = np.zeros(0, np.int64)
    if seen is not None:
        order = np.lexsort((seen[1], seen[0]))  # by row: each chunk's pairs are one slice
        rows, positions = seen[0][order].astype(np.int64), seen[1][order].astype(np.int64)
    wanted = None if todo is None else set(np.asarray(todo).tolist())
    group: list[dict[str, Any]] = []
    size = 0
    for b in range(-(-len(user_ids) // users_per_chunk)):  # one iteration per chunk
        chunk = first_chunk + b
        if wanted is not None and chunk not in wanted:
            continue
        first, stop = b * users_per_chunk, min((b + 1) * users_per_chunk, len(user_ids))
        lo, hi = np.searchsorted(rows, [first, stop])
        row = {"chunk": chunk, "user_ids": user_ids[first:stop],
               "user_table": np.ascontiguousarray(z_u[first:stop], np.float32).tobytes(),
               "seen_rows": (rows[lo:hi] - first).tobytes(),
               "seen_positions": positions[lo:hi].tobytes()}
        group.append(row)
        size += (len(row["user_table"]) + 2 * len(row["seen_rows"])
                 + sum(len(u) + 4 for u in row["user_ids"]))
        if size >= min_bytes:
            yield pa.Table.from_pylist(group, schema=CHUNK_SCHEMA)
            group, size = [], 0
    if group:
        yield pa.Table.from_pylist(group, schema=CHUNK_SCHEMA)


def top_k_table(user_ids: pa.Array, values: np.ndarray, positions: np.ndarray,
                video_ids: pa.Array) -> pa.Table:
    """SCORES rows of a top-k result (U, k'); -inf entries (no candidate left) are dropped."""
    valid = np.isfinite(values)  # a prefix of every row: topk sorts descending
    per_user = valid.sum(1)
    rank = np.broadcast_to(np.arange(1, values.shape[1] + 1, dtype=np.int32), values.shape)
    return pa.Table.from_arrays([
        pc.take(user_ids, pa.array(np.repeat(np.arange(len(per_user)), per_user))),
        pa.array(rank[valid], pa.int32()),
        pc.take(video_ids, pa.array(positions[valid])),
        pa.array(values[valid].astype(np.float32), pa.float32()),
    ], schema=SCORES)


class ScoreChunks:
    """Ray Data actor: chunk rows -> one committed-to-be part of ``scores`` per chunk.

    The clip side arrives once (an object-store reference, resolved in ``__init__``); each call
    scores its chunks (``FusedScorer.top_k``), writes each chunk's rows as a staged part with
    the chunk id in its meta, and returns only the part names (PART_SCHEMA).
    """

    def __init__(self, clip_side: dict[str, Any], store: Store, top_k: int, kernel: str,
                 use_gpu: bool, videos_per_block: int):
        import ray

        side = ray.get(clip_side["ref"])
        with warnings.catch_warnings():  # object-store arrays are read-only; never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t_c = torch.from_numpy(side["clip_thresholds"])
            w = torch.from_numpy(side["out_weight"])
        self.scorer = FusedScorer(t_c, w, side["out_bias"], kernel=kernel,
                                  device="cuda" if use_gpu else "cpu",
                                  videos_per_block=videos_per_block)
        self.video_ids = side["video_ids"]
        self.top_k = top_k
        self.table = store.table(SCORES_TABLE)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        width = self.scorer.width
        for row in batch.to_pylist():  # one row per chunk of users
            user_ids = pa.array(row["user_ids"], pa.string())
            z_u = torch.from_numpy(np.frombuffer(row["user_table"], np.float32).reshape(
                len(user_ids), width).copy())  # (U, G)
            seen = (torch.from_numpy(np.frombuffer(row["seen_rows"], np.int64).copy()),
                    torch.from_numpy(np.frombuffer(row["seen_positions"], np.int64).copy()))
            values, positions = self.scorer.top_k(z_u, self.top_k, seen)
            rows = top_k_table(user_ids, values.cpu().numpy(), positions.cpu().numpy(),
                               self.video_ids)
            part = self.table.write_part(rows, {"chunks": [row["chunk"]],
                                                "users": len(user_ids)})
            out.append({"chunk": row["chunk"], "part_path": part.path, "part_rows": part.rows,
                        "part_meta": json.dumps(part.meta)})
        return pa.Table.from_pylist(out, schema=PART_SCHEMA)


# --------------------------------------------------------------------------- driver: run


@dataclass
class ScoreSummary:
    users: int  # M, users of the graph
    candidates: int  # V
    chunks: int  # all chunks of the run
    scored_chunks: int  # scored by this call
    skipped_chunks: int  # already committed with the same identity
    rows: int  # committed rows of the table
    cold_users: int  # users without training interactions (scored from the clip side)
    kernel: str
    actors: int
    started_over: bool  # another identity was committed before: replaced
    seconds: float
    table_uri: str
    shard_tasks: int = 0  # Ray tasks that computed the embeddings (0: embeddings given)

    def line(self) -> str:
        if not self.scored_chunks:
            return (f"score: skipped ({self.chunks} chunks of {self.users} users already "
                    f"committed with this run identity) -> {self.table_uri}")
        return (f"score: {self.users} users x {self.candidates} candidate videos; "
                f"{self.scored_chunks} chunks scored, {self.skipped_chunks} skipped (already "
                f"committed); {self.rows} rows, {self.cold_users} cold users; embeddings "
                f"{f'{self.shard_tasks} shard task(s)' if self.shard_tasks else 'given'}; "
                f"kernel {self.kernel}, {self.actors} actor(s), {self.seconds:.1f}s -> "
                f"{self.table_uri}")


def committed_chunks(store: Store, identity: dict[str, Any]) -> set[int] | None:
    """Chunk ids committed under ``identity``; None when the table holds another identity."""
    table = store.table(SCORES_TABLE)
    manifest = table.manifest()
    if manifest is None:
        return set()
    if manifest.get("metadata", {}).get("identity") != json.loads(json.dumps(identity)):
        return None
    return {int(c) for p in table.parts() for c in p.meta.get("chunks", [])}


def resolve_kernel(kernel: str, use_gpu: bool, inputs: ScoringInputs, actors: int) -> str:
    """``auto``: eager on GPUs and for small work; compiled for large CPU work with a compiler."""
    if kernel not in KERNELS:
        raise ConfigError(f"score.kernel={kernel!r} must be one of {list(KERNELS)}")
    if kernel != "auto":
        return kernel
    if use_gpu:
        return "eager"
    elements = inputs.n_users * inputs.clip_side.clip_thresholds.numel()  # U x V x N_c x G
    has_compiler = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++",
                                                 "clang++"))
    return "compiled" if has_compiler and elements / actors > AUTO_COMPILE_MIN_ELEMENTS \
        else "eager"


def run_scoring(cfg: Config, store: Store, *, inputs: ScoringInputs | None = None
                ) -> ScoreSummary:
    """Score every user against the candidates with Ray Data; commit the top-K (module doc).

    Settings from ``cfg.score``: ``kernel`` ("auto", "eager" or "compiled",
    :class:`FusedScorer`), ``videos_per_block``, ``actors`` (the actor pool; 0: one per GPU, else
    one per CPU; never more than objects of chunk rows). ``inputs`` (benchmarks) skips the
    propagation and uses these tables and this identity instead.
    """
    s = cfg.score
    start = time.monotonic()
    plan = None
    if inputs is None:
        plan = plan_scoring(cfg, store)  # refuses a missing run, graph or candidate file
    identity = plan.identity if plan is not None else inputs.identity
    n_chunks = plan.n_chunks if plan is not None else inputs.n_chunks
    done = committed_chunks(store, identity)
    started_over = done is None
    done = done or set()
    todo = [c for c in range(n_chunks) if c not in done]
    table = store.table(SCORES_TABLE)
    if not todo:  # nothing to score: no propagation, no Ray
        meta = table.metadata()
        if not meta.get("complete"):  # a driver killed before its final commit
            meta.update(complete=True)
            table.commit([], meta)
        summary = ScoreSummary(
            users=meta["users"], candidates=meta["candidates"], chunks=n_chunks,
            scored_chunks=0, skipped_chunks=n_chunks, rows=sum(p.rows for p in table.parts()),
            cold_users=meta["cold_users"], kernel="-", actors=0, started_over=False,
            seconds=time.monotonic() - start, table_uri=store.uri("tables", SCORES_TABLE))
        print(summary.line(), flush=True)
        return summary
    if inputs is None:
        inputs = prepare_scoring(cfg, store, plan, done)

    import ray  # Ray from here on: the pool of scoring actors

    from frame_dist.ray_runtime import cluster_has_gpus, init_ray

    init_ray()
    use_gpu = cluster_has_gpus()
    resources = ray.cluster_resources()
    actors = s.actors or (int(resources.get("GPU", 0)) if use_gpu
                          else int(resources.get("CPU", 1)))
    n_actors = max(1, min(actors, len(inputs.user_chunks)))  # one object: one actor's work
    used_kernel = resolve_kernel(s.kernel, use_gpu, inputs, n_actors)
    t = inputs.clip_side
    clip_side = {"ref": ray.put({
        "clip_thresholds": t.clip_thresholds.numpy(), "out_weight": t.out_weight.numpy(),
        "out_bias": t.out_bias, "video_ids": inputs.video_ids})}
    ds = ray.data.from_arrow_refs(inputs.user_chunks)  # made by the shard tasks
    ds = ds.map_batches(
        ScoreChunks, batch_size=1, batch_format="pyarrow",
        fn_constructor_kwargs=dict(clip_side=clip_side, store=store,
                                   top_k=cfg.score.top_k, kernel=used_kernel,
                                   use_gpu=use_gpu, videos_per_block=s.videos_per_block),
        compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=1,
        num_gpus=1 if use_gpu else 0)
    _commit_as_they_arrive(ds, store, cfg, inputs, done, replace=started_over)
    summary = ScoreSummary(
        users=inputs.n_users, candidates=len(inputs.video_ids), chunks=n_chunks,
        scored_chunks=len(todo), skipped_chunks=n_chunks - len(todo),
        rows=sum(p.rows for p in table.parts()), cold_users=inputs.cold_users,
        kernel=used_kernel, actors=n_actors, started_over=started_over,
        shard_tasks=inputs.shard_tasks,
        seconds=time.monotonic() - start, table_uri=store.uri("tables", SCORES_TABLE))
    print(summary.line(), flush=True)
    return summary


def _table_metadata(inputs: ScoringInputs, committed: int, complete: bool) -> dict[str, Any]:
    """Manifest metadata of ``scores``: the run identity and how far the run got."""
    return {"identity": inputs.identity, "chunks": inputs.n_chunks,
            "chunks_committed": committed, "complete": complete,
            "users": inputs.n_users, "candidates": len(inputs.video_ids),
            "cold_users": inputs.cold_users}


def _commit_as_they_arrive(ds: Any, store: Store, cfg: Config, inputs: ScoringInputs,
                           done: set[int], replace: bool) -> None:
    """Drive the dataset, committing staged parts as they arrive; mark the table complete."""
    table = store.table(SCORES_TABLE)
    kill_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    committed = set(done)
    pending: list[Part] = []
    pending_chunks: set[int] = set()
    commits, last_commit = 0, -math.inf

    def commit(final: bool = False) -> None:
        nonlocal pending, commits, last_commit, replace
        committed.update(pending_chunks)
        metadata = _table_metadata(inputs, len(committed),
                                   complete=final and len(committed) == inputs.n_chunks)
        table.commit(pending, metadata, replace=replace, config=None if commits else cfg)
        pending, replace, commits, last_commit = [], False, commits + 1, time.monotonic()
        pending_chunks.clear()
        print(f"score: {len(committed)}/{inputs.n_chunks} chunks committed", flush=True)
        if kill_after and commits >= kill_after and not final:
            print(f"{FAULT_ENV}={kill_after}: killing the driver after commit {commits}",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in block.to_pylist():
            if row["chunk"] in committed or row["chunk"] in pending_chunks:
                continue  # a retried task's second part: stays an uncommitted orphan
            pending.append(Part(row["part_path"], row["part_rows"], json.loads(row["part_meta"])))
            pending_chunks.add(row["chunk"])
        if pending and time.monotonic() - last_commit >= COMMIT_MIN_INTERVAL_S:
            commit()
    commit(final=True)
    if len(committed) != inputs.n_chunks:
        missing = sorted(set(range(inputs.n_chunks)) - committed)
        raise ScoreError(f"{len(missing)} chunk(s) were not scored, e.g. {missing[:5]}")


def read_scores(store: Store) -> pa.Table:
    """The committed ``scores`` table sorted by (user_id, rank)."""
    table = store.table(SCORES_TABLE).read(schema=SCORES)
    return table.sort_by([("user_id", "ascending"), ("rank", "ascending")])


__all__ = ["ClipSide", "FusedScorer", "FusedTables", "ScoreChunks", "ScoreError",
           "ScoreSummary", "ScoringInputs", "ScoringPlan", "UserChunks", "chunk_tables",
           "committed_chunks", "fuse_clips", "fuse_tables", "fuse_users", "plan_scoring",
           "prepare_scoring", "read_candidates", "read_scores", "run_scoring", "top_k_table"]
