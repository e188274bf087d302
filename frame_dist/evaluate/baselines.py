"""Video-level baselines FRAME is measured against, on the same split, indices and metrics.

Every baseline predicts the full-watch logit of a (user, video) pair from the training rows only
and picks its one setting (smoothing or weight decay) on the validation split, by AUC:

* ``constant``: the training full-watch rate (AUC 0.5 by definition; the Logloss floor).
* ``user rate``: (full_u + a * rate) / (views_u + a), a smoothed per-user full-watch rate.
* ``video rate``: the same per video.
* ``FM``: a factorisation machine on user id, video id and the mean video feature x_v:
  y = b_u + b_v + w^T x_v + <e_u, e_v + P x_v>, trained with BCE (the "logistic / FM with ids and
  the mean video feature" baseline; DeepFM's first two parts).
* ``LightGCN``: LightGCN (He et al., 2020) on the user-video graph of full watches, 2 layers,
  y = <e_u, e_v> + b_u + b_v, trained with BCE on every training row.

Pure numpy / torch; ``BaselineData`` is built by the caller (``benchmarks.quality``) from the
store's split through the same loaders as FRAME's evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from frame_dist.model.metrics import all_metrics

RATE_SMOOTHING = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)  # a, chosen on validation
WEIGHT_DECAYS = (1e-4, 1e-3, 3e-3)  # L2 of FM and LightGCN, chosen on validation


@dataclass
class Pairs:
    """(user, video, full-watch label) rows in graph indices."""

    users: np.ndarray  # (n,) int
    videos: np.ndarray  # (n,) int
    labels: np.ndarray  # (n,) 0/1


@dataclass
class BaselineData:
    train: Pairs
    valid: Pairs
    test: Pairs
    video_features: np.ndarray  # (N, F) mean frame feature of every video
    n_users: int
    n_videos: int


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def pair_metrics(pairs: Pairs, logits: np.ndarray, ks: tuple[int, ...] = (3, 5)
                 ) -> dict[str, float]:
    return all_metrics(pairs.users, pairs.labels, np.asarray(logits, np.float64), ks)


def smoothed_rate(keys: np.ndarray, labels: np.ndarray, n: int, a: float) -> np.ndarray:
    """(n,) (sum of labels of key + a * mean label) / (rows of key + a)."""
    prior = float(np.mean(labels))
    full = np.bincount(keys, labels.astype(np.float64), minlength=n)
    views = np.bincount(keys, minlength=n)
    return (full + a * prior) / (views + a)


def rate_baseline(data: BaselineData, side: str, ks: tuple[int, ...]) -> dict[str, float]:
    """Smoothed per-user (side="users") or per-video rate; a chosen on validation AUC."""
    n = data.n_users if side == "users" else data.n_videos
    best = None
    for a in RATE_SMOOTHING:
        rate = smoothed_rate(getattr(data.train, side), data.train.labels, n, a)
        auc = pair_metrics(data.valid, logit(rate[getattr(data.valid, side)]), ks)["auc"]
        if best is None or auc > best[0]:
            best = (auc, rate)
    return pair_metrics(data.test, logit(best[1][getattr(data.test, side)]), ks)


class FM(nn.Module):
    """y = b_u + b_v + w^T x_v + <e_u, e_v + P x_v>."""

    def __init__(self, n_users: int, n_videos: int, n_features: int, dim: int = 16):
        super().__init__()
        self.user_bias = nn.Embedding(n_users, 1)
        self.video_bias = nn.Embedding(n_videos, 1)
        self.users = nn.Embedding(n_users, dim)
        self.videos = nn.Embedding(n_videos, dim)
        self.project = nn.Linear(n_features, dim, bias=False)
        self.linear = nn.Linear(n_features, 1)
        for table in (self.user_bias, self.video_bias):
            nn.init.zeros_(table.weight)
        for table in (self.users, self.videos):
            nn.init.normal_(table.weight, std=0.05)

    def forward(self, u: Tensor, v: Tensor, x: Tensor) -> Tensor:
        item = self.videos(v) + self.project(x)
        return (self.user_bias(u)[:, 0] + self.video_bias(v)[:, 0] + self.linear(x)[:, 0]
                + (self.users(u) * item).sum(-1))


class LightGCN(nn.Module):
    """LightGCN on the full-watch graph: layer-mean of D^-1/2 A D^-1/2 propagations, plus biases."""

    def __init__(self, n_users: int, n_videos: int, train: Pairs, dim: int = 32,
                 layers: int = 2):
        super().__init__()
        full = train.labels == 1
        idx = np.unique(np.stack([train.users[full], train.videos[full]]), axis=1)
        du = np.bincount(idx[0], minlength=n_users).clip(min=1)
        dv = np.bincount(idx[1], minlength=n_videos).clip(min=1)
        values = torch.as_tensor(1.0 / np.sqrt(du[idx[0]] * dv[idx[1]]), dtype=torch.float32)
        self.adj = torch.sparse_coo_tensor(torch.as_tensor(idx), values, (n_users, n_videos),
                                           check_invariants=True).coalesce()
        self.adj_t = self.adj.t().coalesce()
        self.users = nn.Embedding(n_users, dim)
        self.videos = nn.Embedding(n_videos, dim)
        self.user_bias = nn.Embedding(n_users, 1)
        self.video_bias = nn.Embedding(n_videos, 1)
        self.layers = layers
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.videos.weight, std=0.1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.video_bias.weight)

    def forward(self, u: Tensor, v: Tensor, x: Tensor) -> Tensor:
        eu, ev = self.users.weight, self.videos.weight
        su, sv = eu, ev
        for _ in range(self.layers):
            eu, ev = self.adj @ ev, self.adj_t @ eu
            su, sv = su + eu, sv + ev
        scale = 1.0 / (self.layers + 1)
        return ((su[u] * sv[v]).sum(-1) * scale ** 2 + self.user_bias(u)[:, 0]
                + self.video_bias(v)[:, 0])


def fit_bce(make: Callable[[], nn.Module], data: BaselineData, seed: int, weight_decay: float,
            epochs: int = 20, patience: int = 3, batch: int = 4096, lr: float = 1e-2
            ) -> tuple[float, nn.Module]:
    """Adam on BCE + weight_decay * ||theta||^2 (every batch); the best validation AUC's weights."""
    torch.manual_seed(seed)
    model = make()
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x = torch.as_tensor(data.video_features, dtype=torch.float32)
    u = torch.as_tensor(data.train.users)
    v = torch.as_tensor(data.train.videos)
    y = torch.as_tensor(data.train.labels, dtype=torch.float32)
    best, best_state, waited = -np.inf, None, 0
    for _ in range(epochs):
        model.train()
        for idx in np.array_split(rng.permutation(len(u)), max(1, len(u) // batch)):
            i = torch.as_tensor(idx)
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(u[i], v[i], x[v[i]]), y[i])
            loss = loss + weight_decay * sum(p.pow(2).sum() for p in model.parameters())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        auc = pair_metrics(data.valid, predict(model, data.valid, x))["auc"]
        if auc > best:
            best, waited = auc, 0
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    return best, model


@torch.no_grad()
def predict(model: nn.Module, pairs: Pairs, x: Tensor) -> np.ndarray:
    model.eval()
    u, v = torch.as_tensor(pairs.users), torch.as_tensor(pairs.videos)
    return model(u, v, x[v]).double().numpy()


def trained_baseline(name: str, data: BaselineData, seed: int, ks: tuple[int, ...]
                     ) -> dict[str, float]:
    """FM or LightGCN with the weight decay of the best validation AUC; test metrics."""
    f = data.video_features.shape[1]
    make = {"FM": lambda: FM(data.n_users, data.n_videos, f),
            "LightGCN": lambda: LightGCN(data.n_users, data.n_videos, data.train)}[name]
    fits = [fit_bce(make, data, seed, wd) for wd in WEIGHT_DECAYS]
    _, model = max(fits, key=lambda fit: fit[0])
    x = torch.as_tensor(data.video_features, dtype=torch.float32)
    return pair_metrics(data.test, predict(model, data.test, x), ks)


def standardised(features: np.ndarray) -> np.ndarray:
    """Features with zero mean and unit variance per column (constant columns stay 0)."""
    features = np.asarray(features, dtype=np.float64)
    return (features - features.mean(0)) / np.maximum(features.std(0), 1e-6)


def count_baselines(data: BaselineData, ks: tuple[int, ...] = (3, 5)
                    ) -> dict[str, dict[str, float]]:
    """The baselines that only count (no training, no features): constant, user and video
    rate. What the evaluate stage reports beside every run."""
    rate = float(np.mean(data.train.labels))
    constant = pair_metrics(data.test, np.full(len(data.test.labels), logit(np.array(rate))), ks)
    return {"constant": constant,
            "user rate": rate_baseline(data, "users", ks),
            "video rate": rate_baseline(data, "videos", ks)}


def best_baseline(results: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """(name, metrics) of the baseline with the highest test AUC."""
    return max(results.items(), key=lambda item: item[1]["auc"])


def run_baselines(data: BaselineData, seed: int, ks: tuple[int, ...] = (3, 5)
                  ) -> dict[str, dict[str, float]]:
    """Test metrics of every baseline, keyed by name (the module docstring's list)."""
    data = BaselineData(data.train, data.valid, data.test, standardised(data.video_features),
                        data.n_users, data.n_videos)
    return {**count_baselines(data, ks),
            "FM": trained_baseline("FM", data, seed, ks),
            "LightGCN": trained_baseline("LightGCN", data, seed, ks)}
