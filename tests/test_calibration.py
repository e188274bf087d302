"""Platt scaling (frame_dist/model/calibration.py): a hand-solvable fit, scikit-learn's logistic
regression, the degenerate cases, the stored form, and a monotone map that leaves every ranking
metric alone."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from frame_dist.model.calibration import Calibration, CalibrationError, fit_platt
from frame_dist.model.metrics import all_metrics, logloss, sigmoid


def test_fit_on_a_two_valued_logit_is_the_per_value_log_odds() -> None:
    """With y in {0, 1} the maximum-likelihood fit reproduces each value's positive rate:
    sigmoid(b) = 1/4 at y = 0 and sigmoid(a + b) = 3/4 at y = 1, so b = -ln 3, a = 2 ln 3."""
    logits = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=float)
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a regular fit warns about nothing
        cal = fit_platt(logits, labels)
    assert cal.a == pytest.approx(2 * math.log(3), abs=1e-9)
    assert cal.b == pytest.approx(-math.log(3), abs=1e-9)
    np.testing.assert_allclose(cal.apply(np.array([0.0, 1.0])), [0.25, 0.75], atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_fit_equals_sklearn_logistic_regression(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 1500)
    # over-confident, shifted logits: the situation calibration is for
    logits = 3.0 * rng.normal(size=1500) + 2.0 * labels + 4.0
    cal = fit_platt(logits, labels)
    reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(logits[:, None],
                                                                            labels)
    assert cal.a == pytest.approx(reference.coef_[0, 0], abs=1e-4)
    assert cal.b == pytest.approx(reference.intercept_[0], abs=1e-4)
    calibrated = logloss(labels, cal.apply(logits))
    assert calibrated == pytest.approx(log_loss(labels, reference.predict_proba(
        logits[:, None])[:, 1]), abs=1e-9)
    assert calibrated < logloss(labels, sigmoid(logits))  # better than the raw sigmoid
    assert fit_platt(logits, labels) == cal  # deterministic


@pytest.mark.parametrize("logits, labels, why", [
    ([0.3, -1.0, 2.0], [1, 1, 1], r"3 full watch\(es\) of 3"),
    ([0.3, -1.0, 2.0], [0, 0, 0], r"0 full watch\(es\) of 3"),
    ([-2.0, -1.0, 1.0, 2.0], [0, 0, 1, 1], "separate the classes"),
    ([-2.0, -1.0, 0.5, 1.0, 2.0], [1, 1, 0, 1, 0], "slope a=.* is not positive"),
])
def test_degenerate_fits_keep_the_identity_and_warn(logits, labels, why) -> None:
    with pytest.warns(RuntimeWarning, match=rf"calibration: .*{why}.*keeping the identity"):
        cal = fit_platt(np.array(logits), np.array(labels))
    assert cal == Calibration() and cal.is_identity


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(CalibrationError, match=r"labels must be 0/1, got \[0, 2\]"):
        fit_platt(np.zeros(2), np.array([0, 2]))
    with pytest.raises(CalibrationError, match=r"1 non-finite logit"):
        fit_platt(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(CalibrationError, match=r"logits \(3,\) and labels \(2,\)"):
        fit_platt(np.zeros(3), np.array([0, 1]))


def test_round_trip_and_validation_of_stored_values() -> None:
    cal = Calibration(0.25, -1.5)
    assert cal.to_dict() == {"a": 0.25, "b": -1.5}
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert Calibration.from_dict(None) == Calibration()  # a file from before calibration
    assert Calibration.from_dict({"a": np.float32(2.0), "b": 1}) == Calibration(2.0, 1.0)
    bad = [({"a": 0.0, "b": 0.0}, r"a=0.0 must be > 0"),
           ({"a": -1.0, "b": 0.0}, r"a=-1.0 must be > 0"),
           ({"a": float("nan"), "b": 0.0}, r"a=nan must be finite"),
           ({"a": 1.0, "b": float("inf")}, r"b=inf must be finite"),
           ({"a": "1", "b": 0.0}, r"a='1' must be a real number"),
           ({"a": True, "b": 0.0}, r"a=True must be a real number"),
           ({"a": 1.0}, r"expected \{'a': float, 'b': float\}, got \['a'\]"),
           ({"a": 1.0, "b": 0.0, "c": 1}, r"got \['a', 'b', 'c'\]"),
           ([1.0, 0.0], r"got list")]
    for data, message in bad:
        with pytest.raises(CalibrationError, match=rf"^model.pt: .*{message}"):
            Calibration.from_dict(data, "model.pt")


def test_apply_is_sigmoid_of_the_affine_logit() -> None:
    y = np.array([-800.0, -3.0, 0.0, 2.5, 800.0])
    cal = Calibration(0.5, 1.0)
    np.testing.assert_allclose(cal.apply(y), sigmoid(0.5 * y + 1.0), rtol=1e-15)
    np.testing.assert_allclose(Calibration().apply(y), sigmoid(y), rtol=1e-15)
    assert np.isfinite(cal.apply(y)).all() and (np.diff(cal.apply(y)) >= 0).all()


def test_calibration_changes_logloss_only() -> None:
    """A monotone map: AUC, Recall@K and NDCG@K of the calibrated logits are those of the raw
    ones; only Logloss moves (``logloss_raw`` keeps the uncalibrated one)."""
    rng = np.random.default_rng(5)
    users = rng.integers(0, 30, 600)
    labels = rng.integers(0, 2, 600)
    logits = 4.0 * rng.normal(size=600) + 2.0 * labels
    cal = fit_platt(logits, labels)
    assert not cal.is_identity
    raw = all_metrics(users, labels, logits, (3, 5))
    calibrated = all_metrics(users, labels, logits, (3, 5), cal)
    on_calibrated_scores = all_metrics(users, labels, cal.logits(logits), (3, 5))
    for key in ("auc", "recall@3", "ndcg@3", "recall@5", "ndcg@5", "ranked_users"):
        assert calibrated[key] == raw[key] == on_calibrated_scores[key], key
    assert calibrated["logloss_raw"] == raw["logloss_raw"] == raw["logloss"]
    assert calibrated["logloss"] == pytest.approx(logloss(labels, cal.apply(logits)))
    assert calibrated["logloss"] < raw["logloss"]
