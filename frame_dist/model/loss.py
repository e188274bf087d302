"""Hybrid supervision of FRAME (section 3.4, eqs. 14-16) and the one-batch train task.

Labels come as one integer per interaction, ``watched`` (see
``frame_dist.graph.clip_graph.clip_labels``):
clips j < watched are weak positives, clip ``watched`` (when < N_c) is the weak negative where
the user skipped, later clips are unlabelled; watched = N_c is a full watch (all clips positive).

Normalisation (docs/model.md): the paper's sums run over the whole training set; a batch of B
interactions contributes its share of them divided by B, so

    L_batch = (alpha * sum_batch L1 + beta * sum_batch L2) / B + lambda * ||Theta||^2

which keeps the paper's relative weighting of the two sums (alpha : beta) exactly. On W
data-parallel workers pass ``denominator`` = the global batch size, or let the engine average
equal-sized local batches (the same value). The L2 term is the squared norm of the model's
weights (``FRAME.regularized_parameters``), added once per batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frame_dist.model.clip_inputs import FrozenClipInputs
from frame_dist.model.frame import FRAME, FrameOutput
from frame_dist.model.propagation import PropagationGraph


class HybridLoss(nn.Module):
    r"""The hybrid loss L = alpha L_1 + beta L_2 + lambda ||Theta||^2 (eq. 16).

    Point-wise, position-weighted BCE over the labelled clips (eq. 14), eps_j = j / N_c with
    1-based j (later watched clips count more):

    .. math::
        \mathcal{L}_1 = -\sum_{(u,v)} \Big( \sum_{j < w_{uv}} \epsilon_{j+1}
            \log \sigma(y_{u c_{v,j}}) + [w_{uv} < N_c] \log(1 - \sigma(y_{u c_{v,w_{uv}}}))
            \Big)

    Pair-wise BPR (eq. 15) for each skipped interaction with at least one watched clip: the
    mean-pooled h_c of the watched clips, scored as one clip, against the skip clip:

    .. math::
        \mathcal{L}_2 = -\sum_{(u,v): 1 \le w_{uv} < N_c}
            \log \sigma\big(y(u, \bar{c}_{v,<w}) - y(u, c_{v, w_{uv}})\big)

    Both sums are divided by the number of interactions (``denominator``, default B). The L2
    term is lambda times the squared L2 norm of the given parameters (eq. 16 writes ||Theta||_2;
    we use the usual squared form). ``log sigma`` is computed as ``-softplus(-y)``, in float32
    even when the scores come in bf16 (the forward under autocast, ``train.precision``).

    Args:
        alpha (float): weight of L_1. (default: 1.0)
        beta (float): weight of L_2; 0 disables the pair-wise loss. (default: 1.0)
        l2 (float): lambda. (default: 1e-5)

    Example::

        >>> loss_fn = HybridLoss(alpha=1.0, beta=1.0, l2=1e-5)
        >>> loss, stats = loss_fn(model(clip_features, graph, users, videos, watched), watched,
        ...                       model.regularized_parameters())
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, l2: float = 1e-5,
                 position_weights: bool = True):
        super().__init__()
        self.position_weights = position_weights
        if alpha < 0 or beta < 0 or l2 < 0:
            raise ValueError(f"HybridLoss: alpha={alpha}, beta={beta}, l2={l2} must be >= 0")
        self.alpha, self.beta, self.l2 = float(alpha), float(beta), float(l2)

    def forward(self, output: FrameOutput, watched: Tensor,
                parameters: Iterable[Tensor] = (), denominator: float | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch and its parts (detached) for logging.

        Args:
            output: the model's scores, ``clip_scores`` (B, N_c) and ``watched_scores`` (B,).
            watched: (B,) int, fully played clips per interaction (N_c: full watch).
            parameters: Theta of the L2 term.
            denominator: the number of interactions the sums are divided by (default B).
        """
        y = output.clip_scores.float()  # (B, N_c); bf16 under autocast, the sums need fp32
        b, n_c = y.shape
        watched = watched.to(device=y.device, dtype=torch.long)
        if watched.shape != (b,):
            raise ValueError(f"watched has shape {tuple(watched.shape)}, expected ({b},)")
        if b and (int(watched.min()) < 0 or int(watched.max()) > n_c):
            raise ValueError(f"watched must be in [0, {n_c}], got values "
                             f"{watched[(watched < 0) | (watched > n_c)][:5].tolist()}")
        denominator = float(b if denominator is None else denominator)
        if denominator <= 0:
            raise ValueError(f"denominator={denominator} must be > 0 (empty batch?)")

        position = torch.arange(n_c, device=y.device)  # (N_c,) 0-based j
        positive = position[None, :] < watched[:, None]  # (B, N_c)
        negative = position[None, :] == watched[:, None]  # (B, N_c) the skip clip
        eps = ((position + 1).to(y.dtype) / n_c if self.position_weights
               else torch.ones(n_c, dtype=y.dtype, device=y.device))  # (N_c,) eps_j = j / N_c
        zero = y.new_zeros(())
        pos_terms = torch.where(positive, eps * F.softplus(-y), zero)  # -eps log sig(y)
        neg_terms = torch.where(negative, F.softplus(y), zero)  # -log(1 - sig(y))
        pointwise = (pos_terms.sum() + neg_terms.sum()) / denominator

        pairs = (watched >= 1) & (watched < n_c)  # (B,)
        pairwise = zero
        if self.beta > 0:
            skip = watched.clamp(max=n_c - 1)[:, None]  # (B, 1)
            y_skip = y.gather(1, skip).squeeze(1)  # (B,)
            bpr = F.softplus(-(output.watched_scores.float() - y_skip))  # -log sig(y_w - y_s)
            pairwise = torch.where(pairs, bpr, zero).sum() / denominator

        l2 = sum((p.pow(2).sum() for p in parameters), zero)
        loss = self.alpha * pointwise + self.beta * pairwise + self.l2 * l2
        stats = dict(loss=loss.detach(), pointwise=pointwise.detach(),
                     pairwise=pairwise.detach(), l2=l2.detach(),
                     n_pos=positive.sum(), n_neg=negative.sum(), n_pairs=pairs.sum(),
                     n=torch.tensor(b))
        return loss, stats


@dataclass
class InteractionBatch:
    """A batch of training interactions as index tensors."""

    users: Tensor  # (B,) local user rows of the graph
    videos: Tensor  # (B,) video indices
    watched: Tensor  # (B,) fully played clips (N_c: full watch)
    denominator: float | None = None  # global batch size on W workers (None: B)

    def to(self, device: torch.device | str) -> InteractionBatch:
        return InteractionBatch(self.users.to(device), self.videos.to(device),
                                self.watched.to(device), self.denominator)

    def __len__(self) -> int:
        return int(self.users.numel())


class FRAMETrainTask(nn.Module):
    """Model + hybrid loss for one batch: ``task(batch) -> (loss, stats)``.

    Holds the (constant) clip features and propagation graph of this process, so a training
    engine (plain torch or DeepSpeed) only sees a module whose forward returns the loss.
    ``clip_features`` (a tensor, or :class:`FrozenClipInputs`) is non-persistent: it follows
    ``.to(device)`` and stays out of checkpoints; the graph is moved with :meth:`to_device`.

    Example::

        >>> task = FRAMETrainTask(model, HybridLoss(), clip_features, graph)
        >>> loss, stats = task(batch)
        >>> loss.backward()
    """

    def __init__(self, model: FRAME, loss: HybridLoss,
                 clip_features: Tensor | FrozenClipInputs | None, graph: PropagationGraph):
        super().__init__()
        self.model = model
        self.loss = loss
        if isinstance(clip_features, FrozenClipInputs):  # a module of non-persistent buffers
            self.clip_features = clip_features
        else:
            self.register_buffer("clip_features", clip_features, persistent=False)
        self.graph = graph

    def to_device(self, device: torch.device | str) -> FRAMETrainTask:
        """Move the module, its clip features and its graph to ``device``."""
        self.to(device)
        self.graph = self.graph.to(device)
        return self

    def forward(self, batch: InteractionBatch) -> tuple[Tensor, dict[str, Tensor]]:
        device = self.model.layer_weights.device
        batch = batch.to(device)
        output = self.model(self.clip_features, self.graph, batch.users, batch.videos,
                            batch.watched)
        return self.loss(output, batch.watched, self.model.regularized_parameters(),
                         batch.denominator)
