"""kNN and linear-probe classification of frozen embeddings, with bootstrap confidence intervals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import GroupShuffleSplit

from g2l_cache.errors import G2LError
from g2l_student.neighbours import nearest

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass
class Split:
    """Index arrays of the train and test tiles."""

    train: np.ndarray
    test: np.ndarray


def make_split(labels: np.ndarray, split: np.ndarray | None, groups: np.ndarray | None,
               seed: int = 0, test_fraction: float = 0.3) -> Split:
    """The given train/test column, or a seeded split by group (no group on both sides)."""
    check_labels(labels)
    if split is not None:
        s = np.char.lower(split.astype(str))
        train, test = np.flatnonzero(np.isin(s, ["train", "val", "valid", "validation"])), np.flatnonzero(s == "test")
        if len(train) == 0 or len(test) == 0:
            raise G2LError("the 'split' column needs both 'train' (or 'val') and 'test' rows.")
    else:
        g = groups if groups is not None else np.arange(len(labels))
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        train, test = next(splitter.split(np.zeros(len(labels)), labels, g))
    if groups is not None and set(groups[train]) & set(groups[test]):
        raise G2LError("a group (slide/patient) appears in both train and test; fix the 'split' column.")
    if len(np.unique(labels[train])) < 2:
        raise G2LError("the training split has a single class; classification needs at least 2.")
    return Split(np.sort(train), np.sort(test))


def check_labels(labels: np.ndarray) -> None:
    if len(np.unique(labels)) < 2:
        raise G2LError(f"all tiles have the label {labels[0]!r}; classification needs at least 2 classes.")


# Temperature of the similarity-weighted kNN vote (DINO's weighted kNN classifier uses 0.07).
KNN_TEMPERATURE = 0.07


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classes: np.ndarray,
                k: int = 20) -> np.ndarray:
    """Class probabilities from the k nearest (cosine) training tiles, each voting with weight
    exp(similarity / 0.07): closer tiles count more, so an even split is not broken by class order.
    Neighbours are found in blocks (memory O(n·k))."""
    idx, sims = nearest(test_x, train_x, k)
    weights = np.exp((sims - sims[:, :1]) / KNN_TEMPERATURE)  # shifted by the best: no overflow
    votes = train_y[idx]
    proba = np.stack([(weights * (votes == c)).sum(1) for c in classes], axis=1)
    return proba / proba.sum(1, keepdims=True)


def linear_probe_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                         groups: np.ndarray | None, seed: int = 0) -> tuple[np.ndarray, float, str]:
    """L2 logistic regression; C chosen on a group-wise validation split of the training tiles.
    Returns (probabilities, C, how C was chosen)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, sx = (train_x - mean) / std, (test_x - mean) / std
    g = groups if groups is not None else np.arange(len(train_y))
    best_c, best = C_GRID[0], -1.0
    how = (f"only {len(np.unique(g))} training groups, too few (< 4) for a validation split: C = "
           f"{C_GRID[0]} (the strongest regularisation) without selection")
    if len(np.unique(g)) >= 4:
        inner = GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=seed)
        fit_i, val_i = next(inner.split(tx, train_y, g))
        if len(np.unique(train_y[fit_i])) > 1:
            for c in C_GRID:
                clf = LogisticRegression(C=c, max_iter=2000).fit(tx[fit_i], train_y[fit_i])
                score = balanced_accuracy_score(train_y[val_i], clf.predict(tx[val_i]))
                if score > best:
                    best_c, best = c, score
            how = f"C = {best_c} chosen from {list(C_GRID)} on a group-wise validation split"
    clf = LogisticRegression(C=best_c, max_iter=2000).fit(tx, train_y)
    return clf.predict_proba(sx), best_c, how


def scores(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, weighted F1 and AUROC (binary, or one-vs-rest macro)."""
    pred = classes[np.argmax(proba, axis=1)]
    out = {"balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
           "f1_weighted": float(f1_score(y_true, pred, average="weighted"))}
    present = np.unique(y_true)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif len(classes) == 2:
        out["auroc"] = float(roc_auc_score(y_true == classes[1], proba[:, 1]))
    else:
        cols = [list(classes).index(c) for c in present]
        p = proba[:, cols] / np.maximum(proba[:, cols].sum(1, keepdims=True), 1e-12)
        out["auroc"] = float(roc_auc_score(y_true, p, multi_class="ovr", labels=present)) if len(present) > 2 \
            else float(roc_auc_score(y_true == present[1], p[:, 1]))
    return out


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray, n: int = 1000,
                 seed: int = 0, groups: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of each score over `n` resamples: of whole groups (patients or
    slides, all their tiles together) when `groups` is given, else of the test tiles. Tiles of one
    slide are not independent, so resampling tiles gives intervals that are too narrow."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        order = np.argsort(np.asarray(groups).astype(str), kind="stable")
        _, starts = np.unique(np.asarray(groups).astype(str)[order], return_index=True)
        members = np.split(order, starts[1:])
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        if groups is not None:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        else:
            idx = rng.integers(0, len(y_true), len(y_true))
        if len(np.unique(y_true[idx])) < 2:
            continue
        for name, value in scores(y_true[idx], proba[idx], classes).items():
            draws.setdefault(name, []).append(value)
    return {name: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5)))
            for name, v in draws.items()}


def classification_report(x: np.ndarray, labels: np.ndarray, split: Split, groups: np.ndarray | None,
                          k: int = 20, n_boot: int = 1000, seed: int = 0) -> tuple[list[dict], str]:
    """Rows of (metric, value, k, ci_low, ci_high) for kNN and the linear probe, and how the
    probe's C was chosen."""
    classes = np.unique(labels)
    tr, te = split.train, split.test
    rows = []
    linear, _, how = linear_probe_predict(x[tr], labels[tr], x[te], groups[tr] if groups is not None else None, seed)
    probas = {"knn": knn_predict(x[tr], labels[tr], x[te], classes, k), "linear": linear}
    for method, proba in probas.items():
        ci = bootstrap_ci(labels[te], proba, classes, n_boot, seed, groups[te] if groups is not None else None)
        for name, value in scores(labels[te], proba, classes).items():
            low, high = ci.get(name, (float("nan"), float("nan")))
            rows.append({"metric": f"{method}_{name}", "value": value,
                         "k": k if method == "knn" else None, "ci_low": low, "ci_high": high})
    return rows, how
