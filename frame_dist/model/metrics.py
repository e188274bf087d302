"""Evaluation metrics of FRAME (section 4.1): AUC, Logloss, Recall@K, NDCG@K.

Labels are video-level: 1 when the user fully watched the video. Everything is vectorised numpy
(the ranking metrics sort all users at once with ``np.lexsort``; no Python loop per user).
Definitions are in docs/model.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


class MetricError(ValueError):
    """Inputs a metric cannot be computed on (lengths differ, one class only, ...)."""


def _arrays(labels: np.ndarray, scores: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise MetricError(f"{name}: labels {y.shape} and scores {s.shape} must be equal-length "
                          "1-d arrays")
    if not np.isin(y, (0, 1)).all():
        raise MetricError(f"{name}: labels must be 0/1, got {np.unique(y)[:5].tolist()}")
    if not np.isfinite(s).all():
        raise MetricError(f"{name}: {int((~np.isfinite(s)).sum())} non-finite score(s) at "
                          f"positions {np.flatnonzero(~np.isfinite(s))[:5].tolist()}")
    return y.astype(bool), s


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, rank-based (Mann-Whitney U), ties count one half.

    AUC = (sum of the positives' average ranks - P (P + 1) / 2) / (P N).
    """
    y, s = _arrays(labels, scores, "auc")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError(f"auc: needs both classes, got {n_pos} positive(s) and {n_neg} "
                          "negative(s)")
    ranks = rankdata(s, method="average")  # 1-based, ties averaged
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, natural log, probabilities clipped to [eps, 1 - eps]."""
    y, p = _arrays(labels, probabilities, "logloss")
    if len(y) == 0:
        raise MetricError("logloss: no samples")
    if ((p < 0) | (p > 1)).any():
        raise MetricError("logloss: probabilities must lie in [0, 1]")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def ranking_metrics(users: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    ks: Sequence[int] = (3, 5)) -> dict[str, float]:
    """Recall@K and NDCG@K per user over that user's test videos, averaged over users.

    Each user's videos are ranked by descending score (ties keep input order). Users without a
    positive are skipped. With P_u positives and rel_i the label at (0-based) rank i:

    * Recall@K = (hits in the top K) / P_u;
    * NDCG@K = DCG / IDCG, DCG = sum_{i<K} rel_i / log2(i + 2), IDCG = sum_{i<min(K, P_u)}
      1 / log2(i + 2).

    Returns ``{"recall@K": ..., "ndcg@K": ..., "ranked_users": n}``.
    """
    y, s = _arrays(labels, scores, "ranking_metrics")
    u = np.asarray(users)
    if u.shape != y.shape:
        raise MetricError(f"ranking_metrics: users {u.shape} and labels {y.shape} differ")
    if any(int(k) <= 0 for k in ks):
        raise MetricError(f"ranking_metrics: ks={list(ks)} must be positive")
    if len(u) == 0:
        raise MetricError("ranking_metrics: no samples")
    order = np.lexsort((np.arange(len(u)), -s, u))  # by user, then score desc, then position
    u_sorted, rel = u[order], y[order]
    first = np.r_[True, u_sorted[1:] != u_sorted[:-1]]  # (n,) first row of each user
    starts = np.flatnonzero(first)  # (U,)
    group = np.cumsum(first) - 1  # (n,) user group of each sorted row
    rank = np.arange(len(u)) - starts[group]  # 0-based rank inside the user's list
    n_groups = len(starts)
    n_pos = np.bincount(group, weights=rel.astype(np.float64), minlength=n_groups)  # (U,)
    has_pos = n_pos > 0
    out: dict[str, float] = {"ranked_users": int(has_pos.sum())}
    discount = 1.0 / np.log2(np.arange(len(u)) + 2.0)  # (n,) 1/log2(i+2) for rank i
    ideal_prefix = np.r_[0.0, np.cumsum(discount)]  # IDCG for P positives: ideal_prefix[P]
    for k in ks:
        k = int(k)
        top = rank < k
        hit = rel & top
        hits = np.bincount(group, weights=hit.astype(np.float64), minlength=n_groups)
        dcg = np.bincount(group, weights=np.where(hit, discount[rank], 0.0),
                          minlength=n_groups)
        idcg = ideal_prefix[np.minimum(k, n_pos).astype(np.int64)]
        if has_pos.any():
            out[f"recall@{k}"] = float(np.mean(hits[has_pos] / n_pos[has_pos]))
            out[f"ndcg@{k}"] = float(np.mean(dcg[has_pos] / idcg[has_pos]))
        else:
            out[f"recall@{k}"] = float("nan")
            out[f"ndcg@{k}"] = float("nan")
    return out


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def all_metrics(users: np.ndarray, labels: np.ndarray, logits: np.ndarray,
                ks: Sequence[int] = (3, 5)) -> dict[str, float]:
    """AUC, Logloss (of sigmoid(logits)) and the ranking metrics of one evaluation set.

    AUC is NaN (not an error) when the set holds one class only.
    """
    y, s = _arrays(labels, logits, "all_metrics")
    out: dict[str, float] = {"n": int(len(y)), "positives": int(y.sum())}
    out["auc"] = auc(y, s) if 0 < y.sum() < len(y) else float("nan")
    out["logloss"] = logloss(y, sigmoid(s))
    out.update(ranking_metrics(users, y, s, ks))
    return out
