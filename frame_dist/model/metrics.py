"""Evaluation metrics of FRAME (section 4.1): AUC, Logloss, Recall@K, NDCG@K.

Labels are video-level: 1 when the user fully watched the video. Everything is vectorised numpy
(the ranking metrics sort all users at once with ``np.lexsort``; no Python loop per user).
Definitions are in docs/model.md, section 6.

Ties: AUC gives a tied (positive, negative) pair one half; Recall@K and NDCG@K tie-average
(McSherry & Najork, ECIR 2008): videos of one user with equal scores share the mean hit and gain
of the ranks they occupy, i.e. the expected metric over every order of the tied videos. No metric
depends on the order of the input rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from frame_dist.model.calibration import Calibration


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

    Each user's videos are ranked by descending score. Users without a positive are skipped.
    Tie rule (tie-averaging, McSherry & Najork 2008): the videos of a user with one score form a
    group g of n_g videos, p_g of them positive, at 0-based ranks [s_g, e_g), e_g = s_g + n_g;
    each of those ranks holds p_g / n_g of a positive. With P_u positives and
    D(i) = 1 / log2(i + 2):

    * Recall@K = sum_g (p_g / n_g) |[s_g, e_g) & [0, K)| / P_u;
    * NDCG@K = DCG / IDCG, DCG = sum_g (p_g / n_g) sum_{i in [s_g, e_g), i < K} D(i),
      IDCG = sum_{i<min(K, P_u)} D(i).

    Without ties (n_g = 1) these are hits in the top K / P_u and sum_{i<K} rel_i D(i); with
    ties, the mean over every order of the tied videos. Scores tie when equal as float64.
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
    n = len(u)
    order = np.lexsort((-s, u))  # by user, then score desc; tied rows in any order
    u_sorted, s_sorted, rel = u[order], s[order], y[order].astype(np.float64)
    first = np.r_[True, u_sorted[1:] != u_sorted[:-1]]  # (n,) first row of each user
    starts = np.flatnonzero(first)  # (U,)
    group = np.cumsum(first) - 1  # (n,) user group of each sorted row
    n_groups = len(starts)
    n_pos = np.bincount(group, weights=rel, minlength=n_groups)  # (U,)
    has_pos = n_pos > 0
    # tie groups: a new one at each user's first row and at each change of score
    tie_first = first | np.r_[True, s_sorted[1:] != s_sorted[:-1]]  # (n,)
    tie_starts = np.flatnonzero(tie_first)  # (T,)
    tie_size = np.diff(np.r_[tie_starts, n])  # (T,) n_g
    share = np.bincount(np.cumsum(tie_first) - 1, weights=rel,
                        minlength=len(tie_starts)) / tie_size  # (T,) p_g / n_g
    tie_user = group[tie_starts]  # (T,)
    lo = tie_starts - starts[tie_user]  # (T,) s_g, 0-based rank in the user's list
    hi = lo + tie_size  # (T,) e_g
    out: dict[str, float] = {"ranked_users": int(has_pos.sum())}
    prefix = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(n) + 2.0))]  # prefix[i] = sum_{j<i} D(j)
    for k in ks:
        k = int(k)
        lo_k, hi_k = np.minimum(lo, k), np.minimum(hi, k)  # the group's ranks inside the top K
        hits = np.bincount(tie_user, weights=share * (hi_k - lo_k), minlength=n_groups)
        dcg = np.bincount(tie_user, weights=share * (prefix[hi_k] - prefix[lo_k]),
                          minlength=n_groups)
        idcg = prefix[np.minimum(k, n_pos).astype(np.int64)]
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
                ks: Sequence[int] = (3, 5), calibration: Calibration | None = None
                ) -> dict[str, float]:
    """AUC, Logloss and the ranking metrics of one evaluation set.

    ``logloss`` scores the reported probabilities ``calibration.apply(logits)`` = sigmoid(a y +
    b) (sigmoid(logits) without a calibration); ``logloss_raw`` scores sigmoid(logits). AUC and
    the ranking metrics read only the order of the logits, which a calibration (a > 0) keeps.
    AUC is NaN (not an error) when the set holds one class only.
    """
    y, s = _arrays(labels, logits, "all_metrics")
    out: dict[str, float] = {"n": int(len(y)), "positives": int(y.sum())}
    out["auc"] = auc(y, s) if 0 < y.sum() < len(y) else float("nan")
    raw = logloss(y, sigmoid(s))
    out["logloss"] = raw if calibration is None else logloss(y, calibration.apply(s))
    out["logloss_raw"] = raw
    out.update(ranking_metrics(users, y, s, ks))
    return out
