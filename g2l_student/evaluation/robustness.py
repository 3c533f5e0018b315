"""Robustness to medical-centre differences: PathoROB's RI (via croma) and de Jong's ratio form.

Both look at each tile's k nearest neighbours (cosine), never counting neighbours of its own group
(slide or patient), and count SO neighbours (same class, other centre) against OS neighbours (other
class, same centre):
  - `ri`: PathoROB's robustness index, SO / (SO + OS) pooled over tiles, in [0, 1], with k chosen
    by biological kNN balanced accuracy as PathoROB does (computed by the maintained `croma` package);
  - `ri_ratio`: de Jong et al.'s ratio form, SO / OS pooled over tiles (> 1 means biology dominates),
    at fixed k (G2L reports k = 3 and 20).
"""

from __future__ import annotations

import warnings

import numpy as np

from g2l_cache.errors import G2LError
from g2l_student.neighbours import group_codes, nearest

RI_K_CANDIDATES = (1, 3, 5, 7, 10, 15, 20, 30, 50)


def check_robustness_inputs(x: np.ndarray, labels: np.ndarray, centers: np.ndarray | None) -> None:
    """Clear errors where the robustness index is undefined."""
    if centers is None:
        raise G2LError("the robustness index needs a 'center' column.")
    if len(np.unique(centers)) < 2:
        raise G2LError(f"every tile comes from centre {centers[0]!r}: the robustness index is undefined "
                       "with a single centre.")
    if len(np.unique(labels)) < 2:
        raise G2LError("the robustness index needs at least 2 classes.")
    if not np.isfinite(x).all():
        raise G2LError("embeddings contain NaN or infinite values.")


def _groups(groups: np.ndarray | None, n: int) -> np.ndarray:
    return np.asarray(groups).astype(str) if groups is not None else np.array([f"t{i}" for i in range(n)])


def so_os_counts(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, groups: np.ndarray | None,
                 k: int) -> tuple[int, int]:
    """Pooled (SO, OS) counts over each tile's k nearest other-group neighbours (cosine), found
    in blocks (memory O(n·k))."""
    codes = group_codes(groups, len(x))  # self and same-group tiles are never neighbours
    idx, _ = nearest(x, x, k, codes, codes)
    valid = idx >= 0
    idx = np.where(valid, idx, 0)
    same_label = labels[idx] == labels[:, None]
    same_center = centers[idx] == centers[:, None]
    so = int((valid & same_label & ~same_center).sum())
    os_ = int((valid & ~same_label & same_center).sum())
    return so, os_


def ri_ratio(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, groups: np.ndarray | None,
             k: int) -> float:
    """de Jong's robustness index: pooled SO / OS at k."""
    check_robustness_inputs(x, labels, centers)
    so, os_ = so_os_counts(x, labels, centers, groups, k)
    if os_ == 0:
        return float("inf") if so else float("nan")
    return so / os_


def pathorob_ri(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, groups: np.ndarray | None,
                k_candidates=RI_K_CANDIDATES) -> tuple[float, int]:
    """PathoROB's RI and the k it chose, computed by croma."""
    import pandas as pd
    from croma import RI

    check_robustness_inputs(x, labels, centers)
    n = len(x)
    manifest = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)],
                             "image_path": [f"s{i}" for i in range(n)],
                             "label": labels.astype(str), "group_id": _groups(groups, n),
                             "center": centers.astype(str)})
    candidates = [k for k in k_candidates if k < n - 1] or [1]
    with warnings.catch_warnings():  # croma warns about tiles without informative neighbours
        warnings.simplefilter("ignore", RuntimeWarning)
        result = RI.compute(np.asarray(x, dtype=np.float64), manifest, confounder_column="center",
                            k_candidates=candidates)
    return float(result.value), int(result.k)
