"""Logistic regression by Newton's method (IRLS), with an L2 penalty on the slopes.

Small and exact enough for the baselines (`naslung.train.baselines`): a handful of features
and about a thousand nodules, no scikit-learn needed.
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-6
"""L2 penalty on the slopes (not the intercept): keeps the fit finite on separable data while
leaving the maximum-likelihood solution practically unchanged otherwise."""


def _penalised_nll(design: np.ndarray, y: np.ndarray, w: np.ndarray, penalty: np.ndarray) -> float:
    z = design @ w
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * w * w))


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE, max_iter: int = 200,
                 tol: float = 1e-10) -> np.ndarray:
    """Coefficients ``[intercept, slopes...]`` of a logistic regression of ``y`` (0/1) on the
    columns of ``x``, by Newton's method (IRLS) with step halving, which always converges."""
    x = np.asarray(x, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    y = np.asarray(y, dtype=np.float64)
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"logistic regression needs as many labels as rows, got {len(y)} and {len(x)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("logistic regression features must be finite")
    if not set(np.unique(y)) <= {0.0, 1.0}:
        raise ValueError("logistic regression labels must be 0 or 1")
    if y.min() == y.max():
        raise ValueError("logistic regression needs both classes in its training data")
    design = np.column_stack([np.ones(len(x)), x])
    penalty = np.full(design.shape[1], ridge)
    penalty[0] = 0.0
    w = np.zeros(design.shape[1])
    w[0] = np.log(y.mean() / (1 - y.mean()))
    loss = _penalised_nll(design, y, w, penalty)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        gradient = design.T @ (p - y) + penalty * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        scale = 1.0
        while scale > 1e-10:
            candidate = w - scale * step
            new_loss = _penalised_nll(design, y, candidate, penalty)
            if new_loss <= loss:
                break
            scale /= 2
        else:
            return w  # no descent left: at the optimum to machine precision
        w, improvement, loss = candidate, loss - new_loss, new_loss
        if improvement <= tol * max(1.0, abs(loss)):
            return w
    return w


def predict_logistic(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Probabilities of class 1 for the rows of ``x`` under ``fit_logistic``'s coefficients."""
    x = np.asarray(x, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    return 1.0 / (1.0 + np.exp(-(coefficients[0] + x @ coefficients[1:])))
