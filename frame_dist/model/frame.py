"""FRAME: fine-grained user interests for micro-video recommendation (Shang et al., SIGIR 2023).

One model class, pure torch. The graphs it propagates over and the propagation strategy (one
process or W workers, see ``frame_dist.model.propagation``) are passed in, never built here.

Shapes: C clips in total (C = N * N_c), M_local users held by this process, d = ``dim``,
F = ``n_clip_features``, B = a batch of (user, video) pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frame_dist.model.clip_inputs import FrozenClipInputs
from frame_dist.model.propagation import LocalPropagation, PropagationGraph, clip_ids

AGGREGATIONS = ("mean", "survival")  # how a video's clip scores make its score (video_logit)


def video_logit(clip_logits: Tensor, aggregation: str) -> Tensor:
    """y(u, v) from the clip scores of a video, (..., N_c) -> (...).

    "mean" (eq. 13): the mean clip logit. "survival": a full watch is the event that no clip
    is skipped, P(full) = prod_j sigmoid(y_j), returned as the logit log P - log(1 - P) in fp32
    (the clip losses of eq. 14 without position weights are then the exact likelihood of where
    the user stopped; docs/model.md section 3).
    """
    if aggregation == "mean":
        return clip_logits.mean(-1)
    if aggregation != "survival":
        raise ValueError(f"aggregation={aggregation!r} must be one of {AGGREGATIONS}")
    log_p = F.logsigmoid(clip_logits.float()).sum(-1)  # log P(full) <= 0
    log_p = log_p.clamp(max=-torch.finfo(log_p.dtype).tiny)  # P < 1: a finite logit
    return log_p - torch.log(-torch.expm1(log_p))


@dataclass
class Embeddings:
    """What one propagation produces: clip embeddings H_c and the dual user interests."""

    h_c: Tensor  # (C or n_clips_asked, d) H_c of eq. 10
    h_u_pos: Tensor  # (M_local, d) H_u^p of eq. 7
    h_u_neg: Tensor | None  # (M_local, d) H_u^n of eq. 7; None without the negative graph

    def __iter__(self):
        return iter((self.h_c, self.h_u_pos, self.h_u_neg))


@dataclass
class UserSide:
    """Eq. 7 of one propagation, and what the clip side (eqs. 8-10) of any clips needs
    (``FRAME.user_side``, ``FRAME.clip_side``)."""

    h_u_pos: Tensor  # (M_local, d) H_u^p of eq. 7
    h_u_neg: Tensor | None  # (M_local, d) H_u^n; None without the negative graph
    clip_rows: Callable[[Tensor | None], Tensor]  # H_c^(0) of clips (None: every clip), (n, d)
    propagation: LocalPropagation  # the clip side's sum over users (eq. 8)


@dataclass
class FrameOutput:
    """Scores of a training batch: every clip of each pair's video, and its watched part."""

    clip_scores: Tensor  # (B, N_c) y(u, c) of eq. 12 for the N_c clips of each pair's video
    watched_scores: Tensor  # (B,) y(u, mean of the watched clips' h_c) (eq. 15); 0 if none


class PreferenceMLP(nn.Module):
    """MLP^p or MLP^n of eq. 11: y = w_2^T ReLU(W_1 [h_u ; h_c] + b_1) + b_2.

    One hidden layer. ``W_1`` is stored as one (hidden, 2d) matrix (the concatenation of the
    paper), but applied as W_1[:, :d] h_u + W_1[:, d:] h_c so a user's half is computed once and
    broadcast over its clips instead of concatenating a copy per clip.

    Example::

        >>> mlp = PreferenceMLP(dim=8, hidden=16)
        >>> mlp(torch.randn(4, 1, 8), torch.randn(4, 3, 8)).shape   # users x clips
        torch.Size([4, 3])
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.hidden = nn.Linear(2 * dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def user_part(self, h_u: Tensor) -> Tensor:
        """W_1[:, :d] h_u, the user half of the first layer: (..., d) -> (..., hidden)."""
        return F.linear(h_u, self.hidden.weight[:, :self.dim])

    def clip_part(self, h_c: Tensor) -> Tensor:
        """W_1[:, d:] h_c + b_1, the clip half with the bias: (..., d) -> (..., hidden)."""
        return F.linear(h_c, self.hidden.weight[:, self.dim:], self.hidden.bias)

    def forward(self, h_u: Tensor, h_c: Tensor) -> Tensor:
        """``h_u`` (..., d) and ``h_c`` (..., d), broadcastable; returns (...) scores."""
        z = self.user_part(h_u) + self.clip_part(h_c)  # (..., hidden) W_1 [h_u ; h_c] + b_1
        return self.out(torch.relu(z)).squeeze(-1)  # (...)


class FRAME(nn.Module):
    r"""FRAME (Shang et al., SIGIR 2023): dual user-clip GCN with preference fusion.

    Visual-enhanced clip embeddings (section 3.1): the clip feature f_c (F-d mean of frame
    features, eq. 1) is reduced to d by a fully connected layer (the paper's FC after the ResNet
    trunk) and enhanced by a learnable d x d matrix:

    .. math::
        \mathbf{e}_c = \mathbf{W}_t (\mathbf{W}_{fc} \mathbf{f}_c + \mathbf{b}_{fc}),
        \qquad \mathbf{H}_c^{(0)} = [\mathbf{e}_c]

    Dual-side GCN over the normalised graphs R~ = D_u^{-1/2} R D_c^{-1/2} (eqs. 6-9), without any
    free user embedding (users exist only through their clips), s = ReLU:

    .. math::
        \mathbf{H}_u^p = s(\tilde{\mathbf{R}}^p \mathbf{H}_c^{(0)} \mathbf{W}_p^{(1)}), \quad
        \mathbf{H}_u^n = s(\tilde{\mathbf{R}}^n \mathbf{H}_c^{(0)} \mathbf{W}_n^{(1)})
        \qquad (7)

        \mathbf{H}_c^{p(1)} = s(\tilde{\mathbf{R}}^{p\top} \mathbf{H}_u^p \mathbf{W}_p^{(2)}),
        \quad \mathbf{H}_c^{n(1)} = s(\tilde{\mathbf{R}}^{n\top} \mathbf{H}_u^n
        \mathbf{W}_n^{(2)}) \qquad (8)

        \mathbf{H}_c^{(1)} = \mathrm{Mean}(\mathbf{H}_c^{p(1)}, \mathbf{H}_c^{n(1)}) \quad (9),
        \qquad \mathbf{H}_c = \alpha_0 \mathbf{H}_c^{(0)} + \alpha_1 \mathbf{H}_c^{(1)} \quad (10)

    Preference fusion (eqs. 11-13):

    .. math::
        y_{uc} = a_p \,\mathrm{MLP}^p(\mathbf{h}_u^p \Vert \mathbf{h}_c)
               - a_n \,\mathrm{MLP}^n(\mathbf{h}_u^n \Vert \mathbf{h}_c), \qquad
        y_{uv} = \frac{1}{N_c} \sum_{j=1}^{N_c} y_{u c_{v,j}}

    and P(full watch) = sigmoid(y_uv); with ``aggregation="survival"`` the clip sigmoids are
    per-clip probabilities of watching on, P(full watch) = prod_j sigmoid(y_{u c_{v,j}}) and
    y_uv is its logit (:func:`video_logit`).

    Args:
        n_clip_features (int): F, size of the clip features (2048 for the ResNet-50 trunk).
        dim (int, optional): d, the embedding size. (default: 128)
        hidden (int, optional): hidden width of MLP^p and MLP^n. (default: 256)
        a_pos (float, optional): a_p, weight of the positive score (eq. 12). (default: 1.0)
        a_neg (float, optional): a_n, weight of the negative score (eq. 12). (default: 0.2)
        use_negative (bool, optional): False drops R~^n, W_n and MLP^n: y = a_p y_p and
            H_c^(1) = H_c^p(1) (Table 6's "without negative clips"). (default: True)
        enhance (bool, optional): False uses e_c = f_c after the FC (no W_t; Table 5's
            "raw"). (default: True)
        use_visual (bool, optional): False replaces the visual features by a free learnable
            clip embedding table of ``n_clips_total`` rows (Table 5's "without visual
            features"); W_t still applies when ``enhance``. (default: True)
        trainable_clip_features (bool, optional): learn the clip features themselves: the
            model owns a (C, F) table, initialised from the extracted features with
            :meth:`init_clip_features`, and ignores the ``clip_features`` passed to it. The table
            then dominates the parameters (and, under ZeRO, the partitioned optimizer state).
            It is left out of the L2 term (shrinking ResNet features towards 0 is not what
            eq. 16 regularises). (default: False)
        aggregation (str, optional): how clip scores make the video score: "mean" (eq. 13)
            or "survival" (:func:`video_logit`; frame-dist's configured default,
            ``model.aggregation``). (default: "mean")
        n_clips_total (int, optional): C, required when ``use_visual=False`` or
            ``trainable_clip_features``.
        propagation (LocalPropagation, optional): the sparse message passing; a distributed
            subclass makes the same model exact on W workers. (default: LocalPropagation())

    Example::

        >>> model = FRAME(n_clip_features=2048, dim=128)
        >>> h_c, h_u_pos, h_u_neg = model.embeddings(clip_features, graph)
        >>> logits = model.score_pairs(clip_features, graph, users, videos)   # (B,)
    """

    def __init__(self, n_clip_features: int, dim: int = 128, hidden: int = 256,
                 a_pos: float = 1.0, a_neg: float = 0.2, use_negative: bool = True,
                 enhance: bool = True, use_visual: bool = True,
                 n_clips_total: int | None = None, trainable_clip_features: bool = False,
                 aggregation: str = "mean", propagation: LocalPropagation | None = None):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"FRAME: aggregation={aggregation!r} must be one of {AGGREGATIONS}")
        if dim <= 0 or hidden <= 0:
            raise ValueError(f"FRAME: dim={dim} and hidden={hidden} must be > 0")
        if use_visual and n_clip_features <= 0:
            raise ValueError(f"FRAME: n_clip_features={n_clip_features} must be > 0 when "
                             "use_visual=True")
        if not use_visual and (n_clips_total is None or n_clips_total <= 0):
            raise ValueError("FRAME: use_visual=False needs n_clips_total (the number of clips "
                             f"C), got {n_clips_total!r}")
        if trainable_clip_features and not use_visual:
            raise ValueError("FRAME: trainable_clip_features=True needs use_visual=True")
        if trainable_clip_features and (n_clips_total is None or n_clips_total <= 0):
            raise ValueError("FRAME: trainable_clip_features=True needs n_clips_total (the "
                             f"number of clips C), got {n_clips_total!r}")
        self.n_clip_features = n_clip_features
        self.dim = dim
        self.hidden = hidden
        self.a_pos = float(a_pos)
        self.a_neg = float(a_neg)
        self.use_negative = use_negative
        self.enhance = enhance
        self.use_visual = use_visual
        self.n_clips_total = n_clips_total
        self.trainable_clip_features = trainable_clip_features
        self.aggregation = aggregation
        self.propagation = propagation if propagation is not None else LocalPropagation()

        if trainable_clip_features:
            self.clip_feature_table = nn.Embedding(n_clips_total, n_clip_features)  # learned f_c
        if use_visual:
            self.input_proj = nn.Linear(n_clip_features, dim)  # the paper's FC after the trunk
        else:
            self.clip_table = nn.Embedding(n_clips_total, dim)  # free clip embeddings
        if enhance:
            self.enhancement = nn.Linear(dim, dim, bias=False)  # W_t
        self.w_pos_1 = nn.Linear(dim, dim, bias=False)  # W_p^(1)
        self.w_pos_2 = nn.Linear(dim, dim, bias=False)  # W_p^(2)
        self.mlp_pos = PreferenceMLP(dim, hidden)  # MLP^p
        if use_negative:
            self.w_neg_1 = nn.Linear(dim, dim, bias=False)  # W_n^(1)
            self.w_neg_2 = nn.Linear(dim, dim, bias=False)  # W_n^(2)
            self.mlp_neg = PreferenceMLP(dim, hidden)  # MLP^n
        # alpha_0, alpha_1 of eq. 10, LightGCN's uniform layer weights as the start
        self.layer_weights = nn.Parameter(torch.full((2,), 0.5))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights (section 4.1.4), zero biases, alpha_0 = alpha_1 = 0.5."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.xavier_uniform_(module.weight)
        with torch.no_grad():
            self.layer_weights.fill_(0.5)

    def model_args(self) -> dict[str, Any]:
        """Constructor arguments (without the propagation) to rebuild this model from a checkpoint.

        ``FRAME(**model.model_args())`` has the same parameter names and shapes.
        """
        return dict(n_clip_features=self.n_clip_features, dim=self.dim, hidden=self.hidden,
                    a_pos=self.a_pos, a_neg=self.a_neg, use_negative=self.use_negative,
                    enhance=self.enhance, use_visual=self.use_visual,
                    n_clips_total=self.n_clips_total,
                    trainable_clip_features=self.trainable_clip_features,
                    aggregation=self.aggregation)

    def regularized_parameters(self) -> list[Tensor]:
        """Theta of the L2 term (eq. 16): every weight matrix and the free clip table; no biases,
        no alpha_0/alpha_1 (a penalty on them only shrinks the layer combination) and no
        trainable clip features (they start as ResNet features, not near 0)."""
        return [p for name, p in self.named_parameters()
                if p.ndim >= 2 and name not in ("layer_weights", "clip_feature_table.weight")]

    @torch.no_grad()
    def init_clip_features(self, clip_features: Tensor) -> None:
        """Start the trainable clip feature table from the extracted features (C, F)."""
        if not self.trainable_clip_features:
            raise ValueError("init_clip_features: the model was built without "
                             "trainable_clip_features")
        table = self.clip_feature_table.weight
        if tuple(clip_features.shape) != tuple(table.shape):
            raise ValueError(f"init_clip_features: got {tuple(clip_features.shape)}, the table "
                             f"is {tuple(table.shape)} (C, F)")
        table.copy_(clip_features.to(device=table.device, dtype=table.dtype))

    # ------------------------------------------------------------------ embeddings (eqs. 1-10)

    def clip_input(self, clip_features: Tensor | None,
                   clip_ids: Tensor | None = None) -> Tensor:
        """H_c^(0) = [e_c]: (C, d) for the rows of ``clip_features``.

        A model that owns its clip table (``use_visual=False`` or ``trainable_clip_features``)
        reads rows ``clip_ids`` of it (global clip ids of a worker's local clips; None: the whole
        table) and ignores ``clip_features``.
        """
        if self.use_visual:
            if self.trainable_clip_features:
                table = self.clip_feature_table
                x = table.weight if clip_ids is None else table(clip_ids)  # (C, F)
            elif clip_features is None:
                raise ValueError("FRAME(use_visual=True) needs clip_features, got None")
            else:
                x = clip_features
            if x.ndim != 2 or x.shape[1] != self.n_clip_features:
                raise ValueError(f"clip_features must be (C, {self.n_clip_features}), got "
                                 f"{tuple(x.shape)}")
            w = self.input_proj.weight
            f_c = self.input_proj(x.to(device=w.device, dtype=w.dtype))  # (C, d)
        else:
            f_c = (self.clip_table.weight if clip_ids is None
                   else self.clip_table(clip_ids))  # (C, d)
        return self.enhancement(f_c) if self.enhance else f_c  # (C, d) e_c = W_t f_c

    def propagate(self, h_c0: Tensor, graph: PropagationGraph, clips: Tensor | None = None,
                  propagation: LocalPropagation | None = None) -> Embeddings:
        """The dual GCN (eqs. 7-10) from H_c^(0) (C, d).

        ``clips`` restricts the clip side (eqs. 8-10) to those clip indices: the result's
        ``h_c`` has one row per entry of ``clips``. The user side is always whole (eq. 8 needs
        every user adjacent to a clip). ``propagation`` replaces the model's own for this call
        only (e.g. a shard's recorded partial sums); None: ``self.propagation``.
        """
        prop = self.propagation if propagation is None else propagation
        side = self._dense_user_side(h_c0, graph, prop)
        return Embeddings(self.clip_side(side, graph, clips), side.h_u_pos, side.h_u_neg)

    def embeddings(self, clip_features: Tensor | FrozenClipInputs | None,
                   graph: PropagationGraph, clips: Tensor | None = None) -> Embeddings:
        """(H_c, H_u^p, H_u^n): the whole propagation from the clip features (eqs. 1-10).

        ``clip_features`` (C, F), or the same features as :class:`FrozenClipInputs` (their
        user-side sums precomputed: the FC runs on the users' sums and ``clips`` only, not on
        all C clips; the same result). Iterable, so
        ``h_c, h_u_pos, h_u_neg = model.embeddings(clip_features, graph)``.
        """
        side = self.user_side(clip_features, graph)
        return Embeddings(self.clip_side(side, graph, clips), side.h_u_pos, side.h_u_neg)

    def user_side(self, clip_features: Tensor | FrozenClipInputs | None,
                  graph: PropagationGraph) -> UserSide:
        """Eq. 7 (every user's H_u^p, H_u^n) and what :meth:`clip_side` needs for any clips:
        :meth:`embeddings` in two halves, so that the clip side can run a chunk of clips at a
        time against one user side."""
        if isinstance(clip_features, FrozenClipInputs):
            return self._frozen_user_side(clip_features, graph)
        return self._dense_user_side(self.clip_input(clip_features, graph.clip_ids), graph,
                                     self.propagation)

    def clip_side(self, side: UserSide, graph: PropagationGraph,
                  clips: Tensor | None = None) -> Tensor:
        """H_c (eqs. 8-10) of ``clips`` (local clip indices; None: every clip), (n, d), from a
        :meth:`user_side`. On W workers every worker calls it alike (its collectives), with
        its own ``clips``, possibly none."""
        prop = side.propagation
        h_c0_rows = side.clip_rows(clips)  # (n, d)
        h_c_pos = torch.relu(self.w_pos_2(
            prop.clips_from_users(graph.pos, side.h_u_pos, clips)))  # (n, d) eq. 8
        if self.use_negative:
            h_c_neg = torch.relu(self.w_neg_2(
                prop.clips_from_users(graph.neg, side.h_u_neg, clips)))  # (n, d) eq. 8
            h_c1 = 0.5 * (h_c_pos + h_c_neg)  # (n, d) eq. 9
        else:
            h_c1 = h_c_pos  # (n, d)
        return self.layer_weights[0] * h_c0_rows + self.layer_weights[1] * h_c1  # (n, d) eq. 10

    def _users(self, sums_pos: Tensor, sums_neg: Tensor | None,
               clip_rows: Callable[[Tensor | None], Tensor], prop: LocalPropagation) -> UserSide:
        """Eq. 7 from the user-side sums R~^p H_c^(0), R~^n H_c^(0) (M, d)."""
        # (R~ H_c^(0)) W costs M_local d^2, less than R~ (H_c^(0) W) at C d^2 when M < C
        h_u_pos = torch.relu(self.w_pos_1(sums_pos))  # (M, d)
        h_u_neg = torch.relu(self.w_neg_1(sums_neg)) if self.use_negative else None  # (M, d)
        return UserSide(h_u_pos, h_u_neg, clip_rows, prop)

    def _dense_user_side(self, h_c0: Tensor, graph: PropagationGraph,
                         prop: LocalPropagation) -> UserSide:
        if h_c0.shape[0] != graph.n_clips:
            raise ValueError(f"H_c^(0) has {h_c0.shape[0]} rows, the graph has {graph.n_clips} "
                             "clips")
        self._check_negative(graph)
        sums_neg = prop.users_from_clips(graph.neg, h_c0) if self.use_negative else None
        return self._users(prop.users_from_clips(graph.pos, h_c0), sums_neg,
                           lambda clips: h_c0 if clips is None else h_c0[clips], prop)

    def _check_negative(self, graph: PropagationGraph) -> None:
        if self.use_negative and graph.neg is None:
            raise ValueError("FRAME(use_negative=True) needs a graph with the negative "
                             "adjacency (graph.neg is None)")

    def _frozen_user_side(self, inputs: FrozenClipInputs, graph: PropagationGraph) -> UserSide:
        """:meth:`user_side` from precomputed R~ X: eq. 7's sums are e(.) of the users' feature
        sums with the bias scaled by R~ 1 (``frame_dist.model.clip_inputs``); H_c^(0) of a
        clip is encoded when its clip side is asked for."""
        if not self.use_visual or self.trainable_clip_features:
            raise ValueError("FrozenClipInputs needs frozen visual features (use_visual=True, "
                             "trainable_clip_features=False)")
        if inputs.n_users != graph.n_users:
            raise ValueError(f"FrozenClipInputs has {inputs.n_users} users, the graph "
                             f"{graph.n_users}")
        self._check_negative(graph)

        def sums(side: str) -> Tensor:  # R~ H_c^(0) = e(R~ X) with b scaled by R~ 1
            x_sums, degree = inputs.user_sums(side)
            w = self.input_proj.weight
            x = F.linear(x_sums.to(w.dtype), w) + degree.to(w.dtype) * self.input_proj.bias
            return self.enhancement(x) if self.enhance else x  # (M, d)

        sums_neg = sums("neg") if self.use_negative else None
        return self._users(sums("pos"), sums_neg,
                           lambda clips: inputs.clip_rows(self.clip_input, clips),
                           self.propagation)

    # ------------------------------------------------------------------ scores (eqs. 11-13)

    def clip_scores(self, h_u_pos: Tensor, h_u_neg: Tensor | None, h_c: Tensor) -> Tensor:
        """y(u, c) = a_p MLP^p([h_u^p; h_c]) - a_n MLP^n([h_u^n; h_c]) (eqs. 11-12).

        Inputs broadcast: (..., d) each; returns (...).
        """
        y = self.a_pos * self.mlp_pos(h_u_pos, h_c)
        if self.use_negative:
            if h_u_neg is None:
                raise ValueError("clip_scores: the model uses the negative side but h_u_neg is "
                                 "None")
            y = y - self.a_neg * self.mlp_neg(h_u_neg, h_c)
        return y

    def video_logit(self, clip_logits: Tensor) -> Tensor:
        """y(u, v) from the clip scores of a video, (..., N_c) -> (...): :func:`video_logit`
        with this model's aggregation."""
        return video_logit(clip_logits, self.aggregation)

    def video_scores(self, users: Tensor, videos: Tensor, h_c: Tensor, h_u_pos: Tensor,
                     h_u_neg: Tensor | None, clips_per_video: int) -> Tensor:
        """y(u, v) (eq. 13) of (user, video) pairs from the full tables of one propagation.

        ``users`` (B,) local user rows, ``videos`` (B,) video indices, ``h_c`` (C, d) in clip
        order c = v * N_c + j. Returns (B,) logits of a full watch.
        """
        h_c_video = h_c.view(-1, clips_per_video, h_c.shape[-1])[videos]  # (B, N_c, d)
        hn = None if h_u_neg is None else h_u_neg[users, None]  # (B, 1, d)
        return self.video_logit(self.clip_scores(h_u_pos[users, None], hn, h_c_video))  # (B,)

    def score_block(self, h_u_pos: Tensor, h_u_neg: Tensor | None, h_c_video: Tensor) -> Tensor:
        """y(u, v) of every user against every video of a block: (U, d), (V, N_c, d) -> (U, V).

        Memory is U * V * N_c * hidden floats: callers chunk users and videos (scoring).
        """
        hp = h_u_pos[:, None, None]  # (U, 1, 1, d)
        hn = None if h_u_neg is None else h_u_neg[:, None, None]
        return self.video_logit(self.clip_scores(hp, hn, h_c_video[None]))  # (U, V)

    def recommend(self, h_u_pos: Tensor, h_u_neg: Tensor | None, h_c_video: Tensor, k: int,
                  exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Top-k videos of a block for each user: (scores (U, k), video positions (U, k)).

        ``exclude`` (U, V) bool masks pairs out (e.g. videos seen in training); positions index
        the block's videos. Call per chunk and merge across video blocks.
        """
        scores = self.score_block(h_u_pos, h_u_neg, h_c_video)  # (U, V)
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        return torch.topk(scores, min(k, scores.shape[1]), dim=1)

    def score_pairs(self, clip_features: Tensor | FrozenClipInputs | None,
                    graph: PropagationGraph, users: Tensor, videos: Tensor,
                    batch_size: int | None = None) -> Tensor:
        """y(u, v) (eq. 13) for (user, video) pairs, ``batch_size`` pairs at a time (None: all
        at once).

        The user side (eq. 7) once; then per chunk the clip side (eqs. 8-10) of its videos'
        clips only, and the pair MLPs: memory follows the chunk (its clips, and chunk x N_c x
        hidden activations), not the number of pairs. On W workers every worker runs as many
        chunks as the worker with the most pairs (``max_over_workers``), the others with empty
        ones, as each chunk's clip side is a collective.
        """
        self.check_pairs(users, videos, graph)
        side = self.user_side(clip_features, graph)
        step = max(1, len(users) if batch_size is None else batch_size)
        n_chunks = side.propagation.max_over_workers(-(-len(users) // step))
        out = []
        for i in range(n_chunks):
            u, v = users[i * step:(i + 1) * step], videos[i * step:(i + 1) * step]
            clips, inverse = self._video_clips(v, graph.clips_per_video)
            h_c = self.clip_side(side, graph, clips).view(-1, graph.clips_per_video, self.dim)
            hn = None if side.h_u_neg is None else side.h_u_neg[u, None]
            out.append(self.video_logit(self.clip_scores(side.h_u_pos[u, None], hn,
                                                         h_c[inverse])))  # (b,)
        return torch.cat(out) if out else side.h_u_pos.new_zeros(0)  # (B,)

    # ------------------------------------------------------------------ fused scores (eqs. 11-13)
    # The first layer of each MLP splits into a user half and a clip half (PreferenceMLP), so
    # a score is the sum of a per-user and a per-clip table, each computed once. With G hidden
    # units (MLP^p's, then MLP^n's; G = 2 hidden, or hidden without the negative side):
    #
    #     y(u, c_{v,j}) = w^T ReLU(Z_u - T_{v,j}) + beta, then video_logit over j
    #     (aggregation="mean": y(u, v) = sum_j w^T ReLU(Z_u - T_{v,j}) + beta, 1/N_c in w)

    def _preference_sides(self) -> list[tuple[PreferenceMLP, float]]:
        """(MLP, signed weight of its score in eq. 12): (MLP^p, a_p) and (MLP^n, -a_n)."""
        sides = [(self.mlp_pos, self.a_pos)]
        if self.use_negative:
            sides.append((self.mlp_neg, -self.a_neg))
        return sides

    def fused_user_table(self, h_u_pos: Tensor, h_u_neg: Tensor | None) -> Tensor:
        """Z_u = [W_p[:, :d] h_u^p ; W_n[:, :d] h_u^n]: (M, d) each -> (M, G), contiguous.

        The user halves of MLP^p and MLP^n (``PreferenceMLP.user_part``) side by side.
        """
        if self.use_negative and h_u_neg is None:
            raise ValueError("fused_user_table: the model uses the negative side but h_u_neg "
                             "is None")
        sides = zip(self._preference_sides(), (h_u_pos, h_u_neg))  # MLP^n only if used
        return torch.cat([mlp.user_part(h_u) for (mlp, _), h_u in sides], -1).contiguous()

    def fused_clip_side(self, h_c: Tensor, clips_per_video: int, videos: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, float, str]:
        """The clip side of the fused score, (T_c, w, beta, aggregation), for ``videos``' clips.

        ``h_c`` (N N_c, d) in clip order c = v * N_c + j; ``videos`` (V,) video indices (None:
        all N). Returns::

            T_c  = -[W_p[:, d:] h_c + b_p ; W_n[:, d:] h_c + b_n]   (V, N_c, G) thresholds
            w    = [a_p w_p ; -a_n w_n] (/ N_c for "mean")           (G,)
            beta = a_p c_p - a_n c_n                                  float
            aggregation = self.aggregation                            "mean" or "survival"

        where Z_c = -T_c are the clip halves (``PreferenceMLP.clip_part``), w_p, c_p the output
        layer of MLP^p (w_n, c_n of MLP^n). Stored negated: ReLU(Z_u + Z_c) = ReLU(Z_u - T_c).
        "mean": y(u, v) = sum_j w^T ReLU(Z_u - T_{v,j}) + beta (eq. 13, 1 / N_c folded into w);
        "survival": y_j = w^T ReLU(Z_u - T_{v,j}) + beta are the clip logits of
        :meth:`video_logit`.
        """
        n_c = clips_per_video
        h_c_video = h_c.view(-1, n_c, self.dim)  # (N, N_c, d)
        if videos is not None:
            h_c_video = h_c_video[videos]  # (V, N_c, d)
        divisor = n_c if self.aggregation == "mean" else 1  # survival needs each clip's own y_j
        clip_parts, weights, bias = [], [], 0.0
        for mlp, scale in self._preference_sides():
            clip_parts.append(mlp.clip_part(h_c_video))  # (V, N_c, hidden)
            weights.append(scale * mlp.out.weight[0] / divisor)  # (hidden,)
            bias += scale * float(mlp.out.bias[0])
        return ((-torch.cat(clip_parts, -1)).contiguous(), torch.cat(weights).contiguous(),
                bias, self.aggregation)

    # ------------------------------------------------------------------ training forward

    def forward(self, clip_features: Tensor | FrozenClipInputs | None,
                graph: PropagationGraph, users: Tensor, videos: Tensor,
                watched: Tensor) -> FrameOutput:
        """Scores a training batch needs (eqs. 12 and 15), propagating only to its clips.

        Args:
            users: (B,) local user rows; videos: (B,) video indices.
            watched: (B,) fully played clips per interaction (N_c for a full watch; see
                ``frame_dist.graph.clip_graph.clip_labels``): the watched part is clips j < watched.

        Returns:
            :class:`FrameOutput` with ``clip_scores`` (B, N_c) for every clip of the video and
            ``watched_scores`` (B,), the score of the mean-pooled watched clips' h_c scored as
            one clip (eq. 15; 0 where nothing was watched).
        """
        n_c = graph.clips_per_video
        self.check_pairs(users, videos, graph)
        if watched.shape != videos.shape:
            raise ValueError(f"watched has shape {tuple(watched.shape)}, videos "
                             f"{tuple(videos.shape)}")
        clips, inverse = self._video_clips(videos, n_c)
        h_c, h_u_pos, h_u_neg = self.embeddings(clip_features, graph, clips)
        h_c_pair = h_c.view(-1, n_c, self.dim)[inverse]  # (B, N_c, d)
        hp = h_u_pos[users]  # (B, d)
        hn = None if h_u_neg is None else h_u_neg[users]  # (B, d)
        # eq. 12 with each MLP's clip half computed once per distinct clip of the batch (U of
        # them), then gathered per pair: U d hidden instead of B N_c d hidden multiply-adds
        clip_scores = 0.0
        for (mlp, scale), h_u in zip(self._preference_sides(), (hp, hn)):
            z = (mlp.user_part(h_u)[:, None]  # (B, 1, hidden)
                 + mlp.clip_part(h_c).view(-1, n_c, mlp.hidden.out_features)[inverse])
            clip_scores = clip_scores + scale * mlp.out(torch.relu(z)).squeeze(-1)  # (B, N_c)
        position = torch.arange(n_c, device=h_c.device)
        played = (position[None, :] < watched[:, None]).to(h_c.dtype)  # (B, N_c)
        n_played = played.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1)
        h_watched = (played[..., None] * h_c_pair).sum(1) / n_played  # (B, d) mean pooling
        watched_scores = self.clip_scores(hp, hn, h_watched)  # (B,)
        return FrameOutput(clip_scores, watched_scores)

    @staticmethod
    def check_pairs(users: Tensor, videos: Tensor, graph: PropagationGraph) -> None:
        """Raise unless users and videos are equal-length index tensors inside the graph."""
        if users.shape != videos.shape or users.ndim != 1:
            raise ValueError(f"users {tuple(users.shape)} and videos {tuple(videos.shape)} must "
                             "be equal-length 1-d index tensors")
        for name, idx, n in (("users", users, graph.n_users), ("videos", videos,
                                                               graph.n_videos)):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                bad = idx[(idx < 0) | (idx >= n)]
                raise IndexError(f"{name} {bad[:5].tolist()} out of range [0, {n}) of the graph")

    @staticmethod
    def _video_clips(videos: Tensor, clips_per_video: int) -> tuple[Tensor, Tensor]:
        """Clip indices of the distinct ``videos`` ((V_u * N_c,)) and each pair's video slot."""
        uniq, inverse = torch.unique(videos, return_inverse=True)  # (V_u,), (B,)
        clips = clip_ids(uniq, clips_per_video)  # (V_u * N_c,)
        return clips, inverse
