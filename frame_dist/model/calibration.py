"""Platt scaling of FRAME's video logit: P(full watch) = sigmoid(a y(u, v) + b), a > 0.

The model's logit ranks well but its scale is not a probability's (docs/model.md, section 6).
After training, (a, b) minimise the mean log loss of the validation split's logits

    L(a, b) = mean_i [ softplus(a y_i + b) - t_i (a y_i + b) ]

(Newton's method in float64 with a backtracking line search, started at the identity a = 1,
b = 0; L is convex, so the result is the maximum-likelihood logistic fit of t on y, as
``sklearn.linear_model.LogisticRegression(penalty=None)`` finds it). A monotone map: AUC,
Recall@K and NDCG@K do not change, only Logloss does. Where no such fit exists (one class, a
slope a <= 0 or an infinite one, no convergence) the identity is kept with a warning.

Pure numpy: no torch, Ray or store here; the trainer fits it, artifacts store it with the model.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


class CalibrationError(ValueError):
    """A calibration that cannot be used: non-finite or non-positive slope, bad stored values."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass(frozen=True)
class Calibration:
    """p = sigmoid(a y + b) of a logit y; the identity (a = 1, b = 0) is p = sigmoid(y)."""

    a: float = 1.0
    b: float = 0.0

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise CalibrationError(f"calibration: {name}={value!r} must be a real number")
            if not math.isfinite(value):
                raise CalibrationError(f"calibration: {name}={value!r} must be finite")
            object.__setattr__(self, name, float(value))
        if self.a <= 0:
            raise CalibrationError(f"calibration: a={self.a!r} must be > 0 (a monotone "
                                   "increasing map keeps the model's ranking)")

    @property
    def is_identity(self) -> bool:
        return self.a == 1.0 and self.b == 0.0

    def logits(self, logits: np.ndarray) -> np.ndarray:
        """a y + b (float64): the calibrated logit."""
        return self.a * np.asarray(logits, dtype=np.float64) + self.b

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """P(full watch) = sigmoid(a y + b) (float64, same shape as ``logits``)."""
        return _sigmoid(self.logits(logits))

    def to_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "calibration"
                  ) -> Calibration:
        """Read back :meth:`to_dict`; None (a file from before calibration) is the identity.

        Raises :class:`CalibrationError` naming ``where`` for anything else than finite real
        ``a`` > 0 and ``b``.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping) or set(data) != {"a", "b"}:
            keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise CalibrationError(f"{where}: expected {{'a': float, 'b': float}}, got {keys}")
        try:
            return cls(data["a"], data["b"])
        except CalibrationError as exc:
            raise CalibrationError(f"{where}: {exc}") from None


def _mean_loss(x: np.ndarray, t: np.ndarray, a: float, b: float) -> float:
    z = a * x + b
    return float(np.mean(np.logaddexp(0.0, z) - t * z))


def fit_platt(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100,
              tol: float = 1e-10) -> Calibration:
    """(a, b) minimising the mean log loss of sigmoid(a y + b) against ``labels`` (0/1).

    ``logits`` (n,), ``labels`` (n,). Deterministic (float64 Newton steps from a = 1, b = 0;
    stops when the gradient's largest entry is below ``tol``). Warns and returns the identity
    when the labels hold one class, when the fitted slope is not positive (the logits rank no
    better than chance, or infinite: every full watch scored above every skip) or when the fit
    does not converge.
    """
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(labels)
    if x.ndim != 1 or x.shape != t.shape:
        raise CalibrationError(f"fit_platt: logits {x.shape} and labels {t.shape} must be "
                               "equal-length 1-d arrays")
    if not np.isin(t, (0, 1)).all():
        raise CalibrationError(f"fit_platt: labels must be 0/1, got {np.unique(t)[:5].tolist()}")
    if not np.isfinite(x).all():
        raise CalibrationError(f"fit_platt: {int((~np.isfinite(x)).sum())} non-finite logit(s)")
    t = t.astype(np.float64)
    positives = int(t.sum())
    if positives == 0 or positives == len(t):
        warnings.warn(f"calibration: the validation split has {positives} full watch(es) of "
                      f"{len(t)}; keeping the identity (p = sigmoid(y))", RuntimeWarning,
                      stacklevel=2)
        return Calibration()
    if x[t == 0].max() < x[t == 1].min():  # the likelihood grows without bound as a -> inf
        return _identity_because("the validation logits separate the classes (every full "
                                 "watch above every skip): the best slope is infinite")
    a, b = 1.0, 0.0
    loss = _mean_loss(x, t, a, b)
    for _ in range(max_iter):
        p = _sigmoid(a * x + b)
        r, w = p - t, p * (1.0 - p)
        grad = np.array([np.mean(r * x), np.mean(r)])
        if np.max(np.abs(grad)) < tol:
            break
        hess = np.array([[np.mean(w * x * x), np.mean(w * x)], [np.mean(w * x), np.mean(w)]])
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]  # lstsq: H is singular when w ~ 0
        slope = float(grad @ step)  # > 0 for a descent direction (H is positive semi-definite)
        if not slope > 0:
            step, slope = grad, float(grad @ grad)
        scale = 1.0
        while scale > 1e-12:  # Armijo backtracking: the loss must fall
            new = _mean_loss(x, t, a - scale * step[0], b - scale * step[1])
            if new <= loss - 1e-4 * scale * slope:
                break
            scale *= 0.5
        else:
            break  # no decrease left to find: at the minimum to float precision
        a, b, loss = a - scale * step[0], b - scale * step[1], new
    else:
        return _identity_because(f"no convergence in {max_iter} Newton steps (a={a:.4g}, "
                                 f"b={b:.4g})")
    if not (math.isfinite(a) and math.isfinite(b)):
        return _identity_because(f"the fit diverged (a={a}, b={b})")
    if a <= 0:
        return _identity_because(f"the fitted slope a={a:.4g} is not positive: the validation "
                                 "logits rank no better than chance")
    return Calibration(a, b)


def _identity_because(why: str) -> Calibration:
    warnings.warn(f"calibration: {why}; keeping the identity (p = sigmoid(y))", RuntimeWarning,
                  stacklevel=3)
    return Calibration()
