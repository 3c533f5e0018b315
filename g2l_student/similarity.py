"""Representation similarity: linear and debiased CKA, centred R², neighbour overlap, mean cosine (numpy, float64)."""

from __future__ import annotations

import numpy as np

from g2l_cache.errors import G2LError
from g2l_student.neighbours import nearest


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise G2LError(f"need two embedding matrices of the same tiles, got {a.shape} and {b.shape}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise G2LError("embeddings contain NaN or infinite values.")
    return a, b


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between two embeddings of the same n samples."""
    a, b = _check_pair(a, b)
    a = a - a.mean(0)
    b = b - b.mean(0)
    cross = np.linalg.norm(a.T @ b, "fro") ** 2
    denom = np.linalg.norm(a.T @ a, "fro") * np.linalg.norm(b.T @ b, "fro")
    return float(cross / denom) if denom > 0 else 0.0


def _unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012) of two Gram matrices with zeroed diagonals."""
    n = k.shape[0]
    ones_k, ones_l = k.sum(0), l.sum(0)
    total = np.sum(k * l) + ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2)) - 2 * ones_k @ ones_l / (n - 2)
    return float(total / (n * (n - 3)))


def debiased_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA from the unbiased HSIC: near 0 for unrelated embeddings even when samples are
    fewer than dimensions, where linear CKA drifts towards 1 (two random ViTs score 0.97 on 24 tiles)."""
    a, b = _check_pair(a, b)
    if a.shape[0] < 4:
        raise G2LError("debiased CKA needs at least 4 samples.")
    k, l = a @ a.T, b @ b.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    denom = _unbiased_hsic(k, k) * _unbiased_hsic(l, l)
    return _unbiased_hsic(k, l) / np.sqrt(denom) if denom > 0 else 0.0


def centred_r2(pred: np.ndarray, target: np.ndarray) -> float:
    """1 - residual / total sum of squares around the target's mean vector: 1 is a perfect fit,
    0 is no better than predicting the teacher's mean embedding."""
    pred, target = _check_pair(pred, target)
    if pred.shape != target.shape:
        raise G2LError(f"R² needs equal shapes, got {pred.shape} and {target.shape}.")
    total = np.sum((target - target.mean(0)) ** 2)
    return float(1 - np.sum((target - pred) ** 2) / total) if total > 0 else 0.0


def _cosine_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    return nearest(x, x, k, exclude_self=True)[0]


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each sample's k nearest (cosine) neighbours under b that are also neighbours under a."""
    a, b = _check_pair(a, b)
    k = min(k, a.shape[0] - 1)
    if k < 1:
        raise G2LError("neighbour overlap needs at least 2 samples.")
    na, nb = np.sort(_cosine_neighbours(a, k), 1), np.sort(_cosine_neighbours(b, k), 1)
    # shared neighbours per row: each of na's k entries found in nb's sorted row
    pos = np.minimum(np.stack([np.searchsorted(row, q) for row, q in zip(nb, na)]), k - 1)
    shared = (np.take_along_axis(nb, pos, 1) == na).sum(1)
    return float(np.mean(shared / k))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity of two same-shaped matrices."""
    a, b = _check_pair(a, b)
    if a.shape != b.shape:
        raise G2LError(f"cosine similarity needs equal shapes, got {a.shape} and {b.shape}.")
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))
