"""kNN and linear-probe classification of frozen embeddings, with bootstrap confidence intervals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import GroupShuffleSplit

from g2l_cache.errors import G2LError
from g2l_student.neighbours import group_codes, nearest

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
    """L2 logistic regression on standardised features; C chosen on a group-wise validation split
    of the training tiles. Returns (probabilities, C, how C was chosen).

    sklearn's objective (sum of log-losses + |w|^2 / 2C, intercept not penalised; multinomial for
    more than 2 classes) fitted by full-batch L-BFGS in torch. The standardisation is folded into
    the weights and the validation split is a mask, so the training matrix is never copied: a 262k
    x 1536 probe fits in the memory of its embeddings."""
    classes, y = np.unique(train_y, return_inverse=True)
    x = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    mean, std = _column_stats(x)
    g = groups if groups is not None else np.arange(len(train_y))
    best_c, best = C_GRID[0], -1.0
    how = (f"only {len(np.unique(g))} training groups, too few (< 4) for a validation split: C = "
           f"{C_GRID[0]} (the strongest regularisation) without selection")
    if len(np.unique(g)) >= 4:
        inner = GroupShuffleSplit(n_splits=1, test_size=0.25, random_state=seed)
        fit_i, val_i = next(inner.split(np.zeros(len(y)), y, g))
        if len(np.unique(y[fit_i])) > 1:
            mask = torch.zeros(len(y))
            mask[torch.from_numpy(fit_i)] = 1
            for c in C_GRID:
                w, b = _fit_logistic(x, y, len(classes), mean, std, c, mask)
                proba = _probabilities(x, w, b, mean, std)[val_i]  # all rows: no copy of the part
                score = balanced_accuracy_score(y[val_i], proba.argmax(1))
                if score > best:
                    best_c, best = c, score
            how = f"C = {best_c} chosen from {list(C_GRID)} on a group-wise validation split"
    w, b = _fit_logistic(x, y, len(classes), mean, std, best_c, torch.ones(len(y)))
    test = torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32))
    return _probabilities(test, w, b, mean, std), best_c, how


def _column_stats(x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and sd (float64 sums, in chunks: no copy of x)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        total += x[i:i + chunk].double().sum(0)
    mean = total / len(x)
    sq = torch.zeros_like(total)
    for i in range(0, len(x), chunk):
        sq += ((x[i:i + chunk].double() - mean) ** 2).sum(0)
    return mean.float(), (sq / len(x)).sqrt().float() + 1e-6


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    # ((x - mean) / std) @ w + b without forming the standardised matrix
    scaled = w / std[:, None]
    return x @ scaled + (b - mean @ scaled)


def _fit_logistic(x: torch.Tensor, y: np.ndarray, n_classes: int, mean, std, c: float,
                  weight: torch.Tensor, max_iter: int = 500):
    """Weights minimising sum(weight * log-loss) + |w|^2 / (2c) (binary: one logit)."""
    outputs = 1 if n_classes == 2 else n_classes
    w = torch.zeros(x.shape[1], outputs, requires_grad=True)
    b = torch.zeros(outputs, requires_grad=True)
    target = torch.from_numpy(y)
    n = float(weight.sum())
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = _logits(x, w, b, mean, std)
        if outputs == 1:
            losses = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], target.float(), reduction="none")
        else:
            losses = torch.nn.functional.cross_entropy(z, target, reduction="none")
        # divided by n: the same minimum, on a scale L-BFGS's tolerances suit
        loss = ((losses * weight).sum() + (w ** 2).sum() / (2 * c)) / n
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _probabilities(x: torch.Tensor, w, b, mean, std) -> np.ndarray:
    with torch.no_grad():
        z = _logits(x, w, b, mean, std)
        if z.shape[1] == 1:
            p = torch.sigmoid(z[:, 0])
            return torch.stack([1 - p, p], 1).numpy()
        return torch.softmax(z, 1).numpy()


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
    slide are not independent, so resampling tiles gives intervals that are too narrow.

    A resample is a weight per tile (how often it, or its group, was drawn), and each score is
    computed from weighted counts over the fixed test set (AUROC from one sort per class): equal
    to `scores` on the resampled tiles, in O(tiles) per resample."""
    rng = np.random.default_rng(seed)
    truth = np.searchsorted(classes, y_true)
    scorer = _WeightedScores(truth, proba, len(classes))
    unit = group_codes(groups, len(y_true))
    n_units = int(unit.max()) + 1 if len(unit) else 0
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        weight = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units)[unit].astype(np.float64)
        values = scorer(weight)
        if values is None:  # a resample with a single class: no score is defined
            continue
        for name, value in values.items():
            draws.setdefault(name, []).append(value)
    return {name: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5)))
            for name, v in draws.items()}


class _WeightedScores:
    """`scores` (balanced accuracy, weighted F1, AUROC) with a weight per test tile."""

    def __init__(self, truth: np.ndarray, proba: np.ndarray, n_classes: int):
        self.truth, self.n = truth, n_classes
        self.pred = np.argmax(proba, axis=1)
        # per class c (binary: the positive class only): tiles sorted by the score of c, and
        # tie groups, so a weighted Mann-Whitney count is a bincount and a cumulative sum
        self.auc_classes = [1] if n_classes == 2 else list(range(n_classes))
        self.sorted = {}
        for c in self.auc_classes:
            order = np.argsort(proba[:, c], kind="stable")
            ties = np.unique(proba[order, c], return_inverse=True)[1]
            self.sorted[c] = (order, ties, int(ties.max()) + 1 if len(ties) else 0)

    def __call__(self, w: np.ndarray) -> dict[str, float] | None:
        n = self.n
        conf = np.bincount(self.truth * n + self.pred, weights=w, minlength=n * n).reshape(n, n)
        support = conf.sum(1)
        present = support > 0
        if present.sum() < 2:
            return None
        diag = np.diag(conf)
        recall = np.divide(diag, support, out=np.zeros(n), where=present)
        predicted = conf.sum(0)
        precision = np.divide(diag, predicted, out=np.zeros(n), where=predicted > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=precision + recall > 0)
        aucs = [self._auc(c, w) for c in self.auc_classes if present[c]]
        return {"balanced_accuracy": float(recall[present].mean()),
                "f1_weighted": float((f1 * support).sum() / support.sum()),
                "auroc": float(np.mean(aucs)) if aucs else float("nan")}

    def _auc(self, c: int, w: np.ndarray) -> float:
        order, ties, n_ties = self.sorted[c]
        positive = (self.truth[order] == c)
        wp = np.bincount(ties, weights=w[order] * positive, minlength=n_ties)
        wn = np.bincount(ties, weights=w[order] * ~positive, minlength=n_ties)
        below = np.cumsum(wn) - wn  # weighted negatives scored strictly lower
        total_p, total_n = wp.sum(), wn.sum()
        if total_p == 0 or total_n == 0:
            return float("nan")
        return float((wp * (below + 0.5 * wn)).sum() / (total_p * total_n))


def classification_report(x: np.ndarray, labels: np.ndarray, split: Split, groups: np.ndarray | None,
                          k: int = 20, n_boot: int = 1000, seed: int = 0) -> tuple[list[dict], str]:
    """Rows of (metric, value, k, ci_low, ci_high) for kNN and the linear probe, and how the
    probe's C was chosen."""
    classes = np.unique(labels)
    tr, te = split.train, split.test
    rows = []
    train_x, test_x = _rows(x, tr), _rows(x, te)  # one copy each at most, shared by both methods
    linear, _, how = linear_probe_predict(train_x, labels[tr], test_x, groups[tr] if groups is not None else None, seed)
    probas = {"knn": knn_predict(train_x, labels[tr], test_x, classes, k), "linear": linear}
    for method, proba in probas.items():
        ci = bootstrap_ci(labels[te], proba, classes, n_boot, seed, groups[te] if groups is not None else None)
        for name, value in scores(labels[te], proba, classes).items():
            low, high = ci.get(name, (float("nan"), float("nan")))
            rows.append({"metric": f"{method}_{name}", "value": value,
                         "k": k if method == "knn" else None, "ci_low": low, "ci_high": high})
    return rows, how


def _rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[idx], as a view without a copy when idx is a run of consecutive rows."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
        return x[idx[0]:idx[-1] + 1]
    return x[idx]
