"""Robustness to medical-centre differences: PathoROB's RI (via croma) and de Jong's ratio form.

Both look at each tile's k nearest neighbours (cosine), never counting neighbours of its own group
(slide or patient), and count SO neighbours (same class, other centre) against OS neighbours (other
class, same centre):
  - `ri`: PathoROB's robustness index, SO / (SO + OS) pooled over tiles, in [0, 1], with k chosen
    by biological kNN balanced accuracy as PathoROB does (computed by the maintained `croma` package);
  - `ri_ratio`: de Jong et al.'s ratio form, SO / OS pooled over tiles (> 1 means biology dominates),
    at fixed k (G2L reports k = 3 and 20).
croma also gives RI over every candidate k (the curve), MaRI (RI with neighbours weighted by
exp(-distance / tau)), and PathoROB's APD (the drop in linear-probe accuracy as training data are
made more confounded), which needs a 2-centre x 2-class set with enough slides per cell.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CromaRobustness:
    """What croma reports on one embedding: RI at its chosen k, RI at every candidate k, MaRI."""
    ri: float
    ri_k: int
    curve: dict[int, float]
    mari: float
    mari_k: int
    mari_tau: float


def _croma_manifest(labels: np.ndarray, centers: np.ndarray, groups: np.ndarray | None):
    import pandas as pd

    n = len(labels)
    ids = [f"s{i}" for i in range(n)]
    return pd.DataFrame({"sample_id": ids, "image_path": ids, "label": labels.astype(str),
                         "group_id": _groups(groups, n), "center": centers.astype(str)})


def croma_robustness(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, groups: np.ndarray | None,
                     k_candidates=RI_K_CANDIDATES) -> CromaRobustness:
    """PathoROB's RI (k chosen by biological kNN balanced accuracy), its curve over k, and MaRI
    (auto tau), all computed by croma."""
    from croma import MaRI, RI

    check_robustness_inputs(x, labels, centers)
    manifest = _croma_manifest(labels, centers, groups)
    candidates = [k for k in k_candidates if k < len(x) - 1] or [1]
    features = np.asarray(x, dtype=np.float64)
    with warnings.catch_warnings():  # croma warns about tiles without informative neighbours
        warnings.simplefilter("ignore", RuntimeWarning)
        ri = RI.compute(features, manifest, confounder_column="center", k_candidates=candidates)
        curve = RI.compute_curve(features, manifest, confounder_column="center", k_values=candidates)
        mari = MaRI.compute(features, manifest, confounder_column="center", k_candidates=candidates)
    return CromaRobustness(float(ri.value), int(ri.k), {int(k): float(v) for k, v in curve.items()},
                           float(mari.value), int(mari.k), float(mari.tau))


# PathoROB's 2 x 2 (Camelyon) schedule trains on up to 14 slides per (centre, class) cell, keeps
# one slide's worth for validation and tests on the slides behind them.
APD_SLIDES_PER_CELL = 16
APD_MAX_TILES_PER_SLIDE = 30  # PathoROB's Camelyon runs use 300; fewer keep the probe fits cheap


def apd_units(labels: np.ndarray, centers: np.ndarray, groups: np.ndarray | None, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | str:
    """Rows for PathoROB's APD sweep, laid out as croma wants them, or why the data do not allow it.

    A unit ("slide" in PathoROB) is the tiles of one group with one label; every unit contributes
    the same number r of tiles (a seeded sample), the largest r <= 30 that leaves every cell
    16 units. Returns (rows, centre index, class index, r) with each unit's r rows consecutive.
    """
    if groups is None:
        return "APD needs a 'group' column (slides are the unit PathoROB's sweep keeps whole)."
    centre_names, class_names = np.unique(centers), np.unique(labels)
    if len(centre_names) != 2 or len(class_names) != 2:
        return (f"APD (PathoROB's 2-centre x 2-class schedule) needs exactly 2 centres and 2 classes; "
                f"this set has {len(centre_names)} and {len(class_names)}.")
    units: dict[tuple[int, int], list[np.ndarray]] = {(i, j): [] for i in range(2) for j in range(2)}
    for g in np.unique(groups):
        in_group = np.flatnonzero(groups == g)
        if len(np.unique(centers[in_group])) > 1:
            return f"APD needs every group in one centre; group {g!r} spans several."
        i = int(np.searchsorted(centre_names, centers[in_group[0]]))
        for j, name in enumerate(class_names):
            rows = in_group[labels[in_group] == name]
            if len(rows):
                units[i, j].append(rows)
    sizes = {cell: sorted((len(u) for u in us), reverse=True) for cell, us in units.items()}
    short = [cell for cell, s in sizes.items() if len(s) < APD_SLIDES_PER_CELL]
    if short:
        i, j = short[0]
        return (f"APD needs {APD_SLIDES_PER_CELL} groups in every (centre, class) cell; centre "
                f"{centre_names[i]!r}, class {class_names[j]!r} has {len(sizes[i, j])}.")
    r = min(APD_MAX_TILES_PER_SLIDE, *(s[APD_SLIDES_PER_CELL - 1] for s in sizes.values()))
    rng = np.random.default_rng([seed, 4])
    rows, cen, cls = [], [], []
    for (i, j), us in units.items():
        for u in us:
            if len(u) >= r:
                rows.append(np.sort(rng.choice(u, r, replace=False)))
                cen += [i] * r
                cls += [j] * r
    return np.concatenate(rows), np.array(cen), np.array(cls), r


def pathorob_apd(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, groups: np.ndarray | None,
                 iterations: int = 20, seed: int = 0) -> tuple[float, int] | str:
    """PathoROB's Average Performance Drop (croma's faithful port, Camelyon schedule) and the tiles
    per unit it used, or why the data do not allow it. Closer to 0 is more robust."""
    from croma import apd, probe_sweep
    from croma.downstream.probe import pathorob_schedule

    units = apd_units(labels, centers, groups, seed)
    if isinstance(units, str):
        return units
    rows, cen, cls, r = units
    schedule = pathorob_schedule("camelyon", rows_per_slide=r)
    with warnings.catch_warnings():  # sklearn's convergence warnings on tiny probes
        warnings.simplefilter("ignore")
        accuracies = probe_sweep(np.asarray(x[rows], dtype=np.float64), cen, cls, schedule=schedule,
                                 rows_per_slide=r, iterations=iterations, seed=1000 + seed)
    return apd(accuracies), r
