"""AUC, Logloss, Recall@K and NDCG@K against hand-computed values and scikit-learn."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from frame_dist.model.calibration import Calibration
from frame_dist.model.metrics import (
    MetricError,
    all_metrics,
    auc,
    logloss,
    ranking_metrics,
    sigmoid,
)


@pytest.mark.parametrize("labels,scores,expected", [
    ([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1], 0.75),  # 3 of 4 (pos, neg) pairs ordered
    ([1, 0], [0.5, 0.5], 0.5),  # a tie counts one half
    ([1, 1, 0], [0.5, 0.2, 0.5], 0.25),  # (0.5 vs 0.5) = 1/2, (0.2 vs 0.5) = 0
    ([0, 0, 1], [0.1, 0.2, 0.3], 1.0),
    ([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], 0.0),
])
def test_auc_hand_computed(labels, scores, expected) -> None:
    assert auc(np.array(labels), np.array(scores)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_on_random_data_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + 0.5 * labels, 1)  # rounding makes many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_needs_both_classes() -> None:
    with pytest.raises(MetricError, match=r"auc: needs both classes, got 3 positive\(s\) and 0"):
        auc(np.ones(3), np.arange(3.0))


def test_logloss_hand_computed_and_clipped() -> None:
    expected = -(math.log(0.8) + math.log(0.6)) / 2  # = 0.3669845
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(expected)
    assert expected == pytest.approx(0.3669845, rel=1e-6)
    # p = 1 for a negative is clipped to 1 - 1e-7: -ln(1e-7) = 16.1181
    assert logloss(np.array([0]), np.array([1.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.uniform(0.01, 0.99, 200)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)
    with pytest.raises(MetricError, match=r"probabilities must lie in \[0, 1\]"):
        logloss(np.array([1]), np.array([1.5]))


# user 7: 6 videos, 3 positives; user 2: 2 videos, 1 positive; user 5: no positive (skipped)
USERS = np.array([7, 7, 7, 7, 7, 7, 2, 2, 5, 5])
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1, 0.2, 0.3, 0.9])
LABELS = np.array([0, 1, 0, 0, 1, 1, 1, 0, 0, 0])
L3, L6 = 1 / math.log2(3), 1 / math.log2(6)  # discounts of ranks 1 and 4 (0-based)
IDCG3 = 1 + L3 + 0.5  # three positives: ranks 0, 1, 2
EXPECTED = {
    # user 7: top 3 = (0, 1, 0) -> 1 hit of 3; top 5 = (0, 1, 0, 0, 1) -> 2 hits
    # user 2: ranking (0.2: 0, 0.1: 1) -> the positive at rank 1 -> 1 hit of 1
    "recall@3": (1 / 3 + 1) / 2,
    "ndcg@3": (L3 / IDCG3 + L3 / 1.0) / 2,
    "recall@5": (2 / 3 + 1) / 2,
    "ndcg@5": ((L3 + L6) / IDCG3 + L3 / 1.0) / 2,
}


def test_ranking_metrics_hand_computed() -> None:
    out = ranking_metrics(USERS, LABELS, SCORES, ks=(3, 5))
    assert out["ranked_users"] == 2
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, rel=1e-9), key
    assert out["recall@3"] == pytest.approx(0.6666667, rel=1e-6)
    assert out["ndcg@3"] == pytest.approx(0.4635058, rel=1e-6)
    assert out["recall@5"] == pytest.approx(0.8333333, rel=1e-6)
    assert out["ndcg@5"] == pytest.approx(0.5542769, rel=1e-6)


def test_ranking_metrics_do_not_depend_on_row_order() -> None:
    perm = np.random.default_rng(1).permutation(len(USERS))
    out = ranking_metrics(USERS[perm], LABELS[perm], SCORES[perm])
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, rel=1e-9), key


def test_ranking_ties_share_their_ranks_whatever_the_input_order() -> None:
    users, scores = np.array([1, 1]), np.array([0.5, 0.5])
    assert ranking_metrics(users, np.array([0, 1]), scores, ks=(1,))["recall@1"] == 0.5
    assert ranking_metrics(users, np.array([1, 0]), scores, ks=(1,))["recall@1"] == 0.5


# one user, 2 positives: a skip on top, then three videos tied at 0.5 holding one positive at
# ranks 1-3 (each rank holds 1/3 of it), then the other positive at rank 4
TIED_SCORES = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
TIED_LABELS = np.array([0, 1, 0, 0, 1])
D = [1 / math.log2(i + 2) for i in range(5)]  # the discount of each 0-based rank
TIED_EXPECTED = {
    "recall@1": 0.0,
    "recall@2": (1 / 3) / 2,
    "recall@3": (2 / 3) / 2,
    "recall@5": 1.0,
    "ndcg@2": (D[1] / 3) / (D[0] + D[1]),
    "ndcg@3": ((D[1] + D[2]) / 3) / (D[0] + D[1]),
    "ndcg@5": ((D[1] + D[2] + D[3]) / 3 + D[4]) / (D[0] + D[1]),
}


def test_tied_ranking_hand_computed_and_the_mean_over_tie_orders() -> None:
    users = np.zeros(5, np.int64)
    out = ranking_metrics(users, TIED_LABELS, TIED_SCORES, ks=(1, 2, 3, 5))
    for key, value in TIED_EXPECTED.items():
        assert out[key] == pytest.approx(value, rel=1e-12), key
    # tie-averaging = the mean of the untied metric over the 3! orders of the tied videos
    for k in (1, 2, 3, 5):
        orders = [np.r_[0, np.array(p) + 1, 4] for p in itertools.permutations(range(3))]
        per_order = [_loop_reference(users, TIED_LABELS[o], TIED_SCORES[o], k) for o in orders]
        recall, ndcg = np.mean(per_order, axis=0)
        assert out[f"recall@{k}"] == pytest.approx(recall, rel=1e-12)
        assert out[f"ndcg@{k}"] == pytest.approx(ndcg, rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_no_metric_depends_on_the_input_order(seed: int) -> None:
    """Many ties (scores rounded to one decimal): every permutation of the rows gives the same
    metrics, the ranking ones and AUC exactly."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 25, 500)
    labels = rng.integers(0, 2, 500)
    logits = np.round(rng.normal(size=500) + labels, 1)
    expected = all_metrics(users, labels, logits, (1, 3, 5), Calibration(0.7, -0.2))
    for _ in range(5):
        perm = rng.permutation(500)
        out = all_metrics(users[perm], labels[perm], logits[perm], (1, 3, 5),
                          Calibration(0.7, -0.2))
        assert out.keys() == expected.keys()
        for key, value in expected.items():
            if key.startswith("logloss"):  # a mean summed in another order
                assert out[key] == pytest.approx(value, rel=1e-12), key
            else:
                assert out[key] == value, key


def _loop_reference(users, labels, scores, k):
    recalls, ndcgs = [], []
    for u in np.unique(users):
        idx = np.flatnonzero(users == u)
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        rel = labels[idx]
        p = rel.sum()
        if p == 0:
            continue
        recalls.append(rel[:k].sum() / p)
        dcg = sum(r / math.log2(i + 2) for i, r in enumerate(rel[:k]))
        idcg = sum(1 / math.log2(i + 2) for i in range(min(k, p)))
        ndcgs.append(dcg / idcg)
    return np.mean(recalls), np.mean(ndcgs)


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_ranking_matches_per_user_loop(k: int) -> None:
    rng = np.random.default_rng(k)
    users = rng.integers(0, 40, 800)
    labels = (rng.random(800) < 0.3).astype(int)
    scores = rng.normal(size=800)
    out = ranking_metrics(users, labels, scores, ks=(k,))
    recall, ndcg = _loop_reference(users, labels, scores, k)
    assert out[f"recall@{k}"] == pytest.approx(recall, rel=1e-12)
    assert out[f"ndcg@{k}"] == pytest.approx(ndcg, rel=1e-12)


def test_bad_inputs_raise() -> None:
    with pytest.raises(MetricError, match=r"labels must be 0/1, got \[0, 2\]"):
        ranking_metrics(np.array([1, 1]), np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(MetricError, match=r"labels \(2,\) and scores \(3,\)"):
        auc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(MetricError, match=r"1 non-finite score\(s\) at positions \[1\]"):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(MetricError, match=r"ks=\[0\] must be positive"):
        ranking_metrics(USERS, LABELS, SCORES, ks=(0,))


def test_all_metrics_combines_and_uses_sigmoid() -> None:
    logits = np.log(SCORES / (1 - SCORES))  # sigmoid(logits) = SCORES
    np.testing.assert_allclose(sigmoid(logits), SCORES, rtol=1e-12)
    out = all_metrics(USERS, LABELS, logits)
    assert out["auc"] == pytest.approx(roc_auc_score(LABELS, SCORES))
    assert out["logloss"] == out["logloss_raw"] == pytest.approx(log_loss(LABELS, SCORES))
    assert out["ndcg@5"] == pytest.approx(EXPECTED["ndcg@5"])
    assert (out["n"], out["positives"]) == (10, 4)
    assert math.isnan(all_metrics(np.array([0, 0]), np.array([1, 1]), np.zeros(2))["auc"])
