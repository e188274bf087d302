"""The fused top-K kernel of the score stage: pure torch, no Ray.

The model's scoring function split into a user table Z_u and a clip side (T_c, w, beta and the
model's aggregation; ``FRAME.fused_user_table``, ``FRAME.fused_clip_side``), and
:class:`FusedScorer`, which scores user rows against every candidate in cache-sized tiles (eager
or ``torch.compile``) and keeps a running top-k. The equations, kernels and measurements:
docs/score.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from frame_dist.console import FrameDistWarning
from frame_dist.model.frame import AGGREGATIONS, FRAME, video_logit

VIDEOS_PER_BLOCK = 4096  # videos scored between two top-k merges: (U, block) scores in memory
TILE_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 26}  # elements of one eager tile (U_t, V_t, N_c, G)
COMPILED_TILE = (128, 64)  # (users, clips) of the compiled kernel's fixed tile shape
# "auto" compiles the CPU kernel only when an actor's work would take well over the compile time
# (5-60 s) with the eager kernel (~1e9 tile elements/s on one core: 2e11 is ~3 min)
AUTO_COMPILE_MIN_ELEMENTS = 2e11
KERNELS = ("auto", "eager", "compiled")


# --------------------------------------------------------------------------- fused tables


@dataclass
class ClipSide:
    """The clip half of the fused scoring function, shared by every scoring actor."""

    clip_thresholds: Tensor  # (V, N_c, G) T_c = -Z_c of each candidate's clips
    out_weight: Tensor  # (G,) w = [a_p w_p ; -a_n w_n], / N_c for "mean"
    out_bias: float  # beta = a_p c_p - a_n c_n
    aggregation: str  # FRAME.aggregation: how the clip scores make the video's


@dataclass
class FusedTables(ClipSide):
    """The model's scoring function split into a user side and a clip side (docs/score.md)."""

    user_table: Tensor  # (M, G) Z_u


@torch.no_grad()
def fuse_tables(model: FRAME, h_c: Tensor, h_u_pos: Tensor, h_u_neg: Tensor | None,
                clips_per_video: int, videos: Tensor | None = None) -> FusedTables:
    """Z_u of every user and T_c, w, beta of the clips of ``videos`` (default: all).

    ``h_c`` (N N_c, d) in clip order v * N_c + j; ``h_u_pos``, ``h_u_neg`` (M, d).
    """
    return FusedTables(*model.fused_clip_side(h_c, clips_per_video, videos),
                       user_table=model.fused_user_table(h_u_pos, h_u_neg))


# --------------------------------------------------------------------------- scoring kernel


def _tile_clip_scores(z_u: Tensor, t_c: Tensor, w: Tensor, fold: int = 1) -> Tensor:
    """w^T ReLU(z_u - t_{v,j}) per clip: (U_t, G), (V_t, N_c, G), (G,) -> (U_t, V_t, N_c).

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
    return y.sum(-1)  # (U_t, V_t, N_c)


def _tile_scores(z_u: Tensor, t_c: Tensor, w: Tensor, fold: int = 1) -> Tensor:
    """sum_j w^T ReLU(z_u - t_{v,j}) ("mean", 1 / N_c in w): -> (U_t, V_t)."""
    return _tile_clip_scores(z_u, t_c, w, fold).sum(-1)  # (U_t, V_t)


class FusedScorer:
    """y(u, v) of user rows against every candidate video, and their top-k.

    ``aggregation`` is the model's (``ClipSide.aggregation``): "mean" sums the clips' terms
    inside the kernel (eq. 13, 1 / N_c in w); "survival" keeps each clip's logit
    y_j = w^T ReLU(z - t_j) + beta and applies ``frame_dist.model.frame.video_logit``.
    Holds the clip side on its device. ``kernel="eager"``: per tile, one broadcast ``maximum``
    into a reused buffer (U_t, V_t, N_c, G) and one matrix-vector product, as
    ReLU(z - t) = max(z, t) - t (the ``- t`` part is a per-clip constant). ``"compiled"``:
    :func:`_tile_scores` ("mean") or :func:`_tile_clip_scores` ("survival") through
    ``torch.compile`` (one fused loop, the tile never in memory) at one fixed tile shape, inputs
    zero-padded to whole tiles; if compilation fails the scorer warns and falls back to eager.

    Example::

        >>> tables = fuse_tables(model, h_c, h_u_pos, h_u_neg, clips_per_video=4)
        >>> scorer = FusedScorer(tables.clip_thresholds, tables.out_weight, tables.out_bias,
        ...                      aggregation=tables.aggregation)
        >>> values, videos = scorer.top_k(tables.user_table[:1024], k=10)   # (1024, 10) each
    """

    def __init__(self, clip_thresholds: Tensor, out_weight: Tensor, out_bias: float, *,
                 aggregation: str = "mean", kernel: str = "eager",
                 device: torch.device | str = "cpu", videos_per_block: int = VIDEOS_PER_BLOCK):
        if kernel not in ("eager", "compiled"):
            raise ValueError(f"FusedScorer: kernel={kernel!r} must be 'eager' or 'compiled'")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"FusedScorer: aggregation={aggregation!r} must be one of "
                             f"{list(AGGREGATIONS)}")
        if clip_thresholds.ndim != 3 or out_weight.shape != clip_thresholds.shape[-1:]:
            raise ValueError(f"FusedScorer: clip thresholds {tuple(clip_thresholds.shape)} must "
                             f"be (V, N_c, G) and the weight (G,), got {tuple(out_weight.shape)}")
        self.device = torch.device(device)
        self.videos_per_block = max(1, int(videos_per_block))
        self.t_c = clip_thresholds.to(self.device, torch.float32)  # (V, N_c, G)
        self.w = out_weight.to(self.device, torch.float32)  # (G,)
        self.beta = float(out_bias)
        self.aggregation = aggregation
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
            tile_fn = _tile_scores if aggregation == "mean" else _tile_clip_scores
            self._compiled = torch.compile(tile_fn, dynamic=False, fullgraph=True)
            # blocks of whole tiles: no tile is computed twice
            self.videos_per_block = -(-self.videos_per_block // self.video_tile) * self.video_tile
        else:
            self._use_eager()

    def _use_eager(self) -> None:
        self.kernel = "eager"
        # beta and the "- t" half of max(z, t) - t: per clip (survival) or summed over each
        # video's clips (mean, added after the kernel)
        minus_t = self.t_c @ self.w  # (V, N_c)
        self.offset = self.beta - (minus_t.sum(-1) if self.aggregation == "mean"
                                   else minus_t)  # (V,) mean, (V, N_c) survival
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
                              f"{str(exc)[:300]}); using the eager kernel", FrameDistWarning,
                              stacklevel=2)
                self._use_eager()
        return self._eager_scores(z_u, first, stop)

    def _eager_scores(self, z_u: Tensor, first: int, stop: int) -> Tensor:
        n_users, n_c, g = z_u.shape[0], self.n_clips, self.width
        mean = self.aggregation == "mean"
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
                clips = tile @ self.w  # (U_t, V_t, N_c) w^T max(z, t_j)
                if mean:
                    scores = clips.sum(-1)  # (U_t, V_t)
                else:  # y_j = w^T max(z, t_j) + (beta - w^T t_j), then video_logit
                    clips += self.offset[j:j + t.shape[1]]
                    scores = video_logit(clips, self.aggregation)  # (U_t, V_t)
                out[i:i + z.shape[0], j - first:j - first + t.shape[1]] = scores
        if mean:
            out += self.offset[first:stop]
        return out

    def _compiled_scores(self, z_u: Tensor, first: int, stop: int) -> Tensor:
        ut, vt = self.user_tile, self.video_tile
        n_users = z_u.shape[0]
        if n_users % ut:
            z_u = torch.cat([z_u, z_u.new_zeros(-n_users % ut, self.width)])  # whole tiles
        start = first - first % vt  # tiles of the padded clip table
        end = min(stop + -stop % vt, self._t_padded.shape[0])
        out = torch.empty(z_u.shape[0], end - start, device=self.device)  # (U + pad, V'')
        mean = self.aggregation == "mean"
        for i in range(0, z_u.shape[0], ut):
            for j in range(start, end, vt):
                scores = self._compiled(z_u[i:i + ut], self._t_padded[j:j + vt], self.w,
                                        self._fold)  # (U_t, V_t) mean, (U_t, V_t, N_c) survival
                if not mean:  # padded rows and videos give finite logits, sliced off below
                    scores = video_logit(scores + self.beta, self.aggregation)  # (U_t, V_t)
                out[i:i + ut, j - start:j - start + vt] = scores
        return out[:n_users, first - start:stop - start] + (self.beta if mean else 0.0)

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


__all__ = ["AUTO_COMPILE_MIN_ELEMENTS", "COMPILED_TILE", "KERNELS", "TILE_ELEMENTS",
           "VIDEOS_PER_BLOCK", "ClipSide", "FusedScorer", "FusedTables", "fuse_tables",
           "video_logit"]
