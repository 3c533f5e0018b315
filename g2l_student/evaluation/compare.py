"""`g2l eval compare`: metrics for several models on the same tile sets, as CSV, Markdown and PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl

from g2l_cache.errors import G2LError
from g2l_student.evaluation.classify import classification_report, make_split
from g2l_student.evaluation.embedder import Embeddings, embedding_tile_set, read_embeddings
from g2l_student.evaluation.robustness import croma_robustness, pathorob_apd, ri_ratio
from g2l_student.data import whole_group_sample
from g2l_student.neighbours import group_codes
from g2l_student.similarity import debiased_cka, knn_overlap, linear_cka

METRIC_COLUMNS = ["task", "model", "metric", "value", "k", "ci_low", "ci_high"]
RATIO_KS = (3, 20)
MAP_POINTS = 5000
BAR_METRICS = ("knn_balanced_accuracy", "linear_balanced_accuracy", "linear_auroc", "ri")


def similarity_between(a: Embeddings, b: Embeddings, k: int = 10) -> dict[str, float]:
    """Linear CKA, debiased CKA and k-NN overlap of two models' embeddings of the same tiles
    (refuses different tile sets)."""
    if a.data_fingerprint != b.data_fingerprint or a.table["path"].to_list() != b.table["path"].to_list():
        raise G2LError(f"{a.path.name} and {b.path.name} embed different tile sets; similarity compares "
                       "two models on the same tiles.")
    n = len(a.vectors)
    return {"cka": linear_cka(a.vectors, b.vectors),
            "cka_debiased": debiased_cka(a.vectors, b.vectors) if n >= 4 else float("nan"),
            f"knn{k}_overlap": knn_overlap(a.vectors, b.vectors, k=k) if n > 1 else float("nan")}


def _column(e: Embeddings, name: str) -> np.ndarray | None:
    return e.table[name].cast(pl.Utf8).to_numpy() if name in e.table.columns else None


RI_MAX_TILES = 6000  # croma's RI memory grows with tiles²: about 0.8 GB at 6,000 tiles


def ri_sample(groups: np.ndarray | None, n: int, seed: int, limit: int = RI_MAX_TILES) -> np.ndarray:
    """Rows for the robustness index: all, or a seeded sample of whole groups of about `limit` tiles."""
    if n <= limit:
        return np.arange(n)
    return whole_group_sample(group_codes(groups, n), limit, np.random.default_rng([seed, 3]))


def _row(model: str, metric: str, value: float, k: int | None = None) -> dict:
    return {"model": model, "metric": metric, "value": value, "k": k, "ci_low": None, "ci_high": None}


def robustness_rows(name: str, e: Embeddings, labels: np.ndarray, centers: np.ndarray,
                    groups: np.ndarray | None, ri_rows: np.ndarray, apd_iterations: int, seed: int
                    ) -> tuple[list[dict], list[str]]:
    """ri (and its curve over k), mari, ri_ratio at k = 3 and 20, and apd where the data allow it."""
    sub = groups[ri_rows] if groups is not None else None
    r = croma_robustness(e.vectors[ri_rows], labels[ri_rows], centers[ri_rows], sub)
    rows = [_row(name, "ri", r.ri, r.ri_k)]
    rows += [_row(name, "ri_curve", v, kk) for kk, v in r.curve.items()]
    rows.append(_row(name, "mari", r.mari, r.mari_k))
    rows += [_row(name, "ri_ratio", ri_ratio(e.vectors, labels, centers, groups, kk), kk) for kk in RATIO_KS]
    notes = [f"{name}: mari (croma) at k={r.mari_k} with tau={r.mari_tau:.4g}, the median distance to "
             "typed neighbours."]
    if apd_iterations > 0:
        apd = pathorob_apd(e.vectors, labels, centers, groups, apd_iterations, seed)
        if isinstance(apd, str):
            notes.append(f"{name}: apd skipped: {apd}")
        else:
            rows.append(_row(name, "apd", apd[0]))
            notes.append(f"{name}: apd (PathoROB's Camelyon schedule, croma) over {apd_iterations} "
                         f"replicates, {apd[1]} tiles per group and class.")
    return rows, notes


def evaluate_task(models: list[Embeddings], k: int = 20, n_boot: int = 1000, seed: int = 0,
                  apd_iterations: int = 20) -> tuple[list[dict], list[str]]:
    """All metric rows for models that embedded one tile set, plus notes on what was skipped."""
    first = models[0]
    labels = _column(first, "label")
    groups, centers = _column(first, "group"), _column(first, "center")
    split = make_split(labels, _column(first, "split"), groups, seed)
    rows, notes = [], []
    if groups is None:
        notes.append("no 'group' column: tiles are treated as independent (risk of slide leakage), and "
                     "the 95% intervals resample tiles, which makes them too narrow.")
    else:
        notes.append(f"95% intervals: bootstrap over the {len(np.unique(groups[split.test]))} test groups "
                     "(all tiles of a group resampled together).")
    ri_ok = centers is not None and len(np.unique(centers)) >= 2
    if centers is None:
        notes.append("no 'center' column: robustness index skipped.")
    elif not ri_ok:
        notes.append(f"one centre only ({centers[0]}): the robustness index is undefined and was skipped.")
    ri_rows = ri_sample(groups, len(labels), seed)
    if ri_ok and len(ri_rows) < len(labels):
        notes.append(f"ri (croma, which holds memory quadratic in tiles) on a seeded sample of whole groups: "
                     f"{len(ri_rows)} of {len(labels)} tiles; ri_ratio on all tiles.")
    for e in models:
        name = e.path.stem
        report, how = classification_report(e.vectors, labels, split, groups, k, n_boot, seed)
        rows += [{"model": name, **row} for row in report]
        notes.append(f"{name}: linear probe {how}.")
        if ri_ok:
            more_rows, more_notes = robustness_rows(name, e, labels, centers, groups, ri_rows,
                                                    apd_iterations, seed)
            rows += more_rows
            notes += more_notes
        if e is not first:
            rows += [_row(name, f"{metric}_vs_{first.path.stem}", value)
                     for metric, value in similarity_between(first, e).items()]
    return rows, notes


def reference_first(models: list[Embeddings], reference: str | None, task: str) -> list[Embeddings]:
    """The task's models with the reference first: the file `reference` names (its path, its file name
    without .parquet, or the model name it was embedded with), else the first one given."""
    if reference is None:
        return models
    ref = Path(reference)
    picked = [e for e in models if reference in (e.path.stem, e.model) or
              (ref.suffix == ".parquet" and ref.exists() and ref.resolve() == e.path.resolve())]
    if len(picked) != 1:
        names = ", ".join(f"{e.path.stem} (model {e.model})" for e in models)
        raise G2LError(f"--reference {reference!r} names {'no' if not picked else 'more than one'} embedding file "
                       f"of task {task}; its files are {names}.")
    return picked + [e for e in models if e is not picked[0]]


def compare(paths: list[str | Path], out: str | Path, k: int = 20, n_boot: int = 1000, seed: int = 0,
            map_method: str = "auto", apd_iterations: int = 20, reference: str | None = None) -> pl.DataFrame:
    """Evaluate every embedding file, grouped into tasks by tile set; write REPORT/ and return metrics.

    `reference`: the model every `*_vs_` row is measured against (see `reference_first`; default the
    first file of each task); report.md names it."""
    if not paths:
        raise G2LError("give at least one embedding file.")
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) != len(stems):
        raise G2LError("embedding files must have distinct names: the file name is the model's name.")
    # tasks from the files' metadata; each task's vectors are read only while it is evaluated
    tasks: dict[str, list[Path]] = {}
    data_names: dict[str, str] = {}
    for p in paths:
        data, fingerprint = embedding_tile_set(p)
        tasks.setdefault(fingerprint, []).append(Path(p))
        data_names[fingerprint] = data
    names = _task_names(tasks, data_names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows, notes, model_keys, references = [], {}, {}, {}
    for fp, files in tasks.items():
        models = reference_first([read_embeddings(f) for f in files], reference, names[fp])
        model_keys.update({e.path.stem: {"task": names[fp], "model": e.model, "model_fingerprint": e.model_fingerprint}
                           for e in models})
        rows, task_notes = evaluate_task(models, k, n_boot, seed, apd_iterations)
        task_notes.insert(0, f"reference of the *_vs_ rows: {models[0].path.stem} ({models[0].path}, model "
                             f"{models[0].model}).")
        references[names[fp]] = str(models[0].path)
        all_rows += [{"task": names[fp], **r} for r in rows]
        notes[names[fp]] = task_notes
        _plot_maps(models, out / f"map-{names[fp]}.png", map_method, seed)
        del models
    metrics = pl.DataFrame(all_rows, schema={"task": pl.Utf8, "model": pl.Utf8, "metric": pl.Utf8,
                                             "value": pl.Float64, "k": pl.Int64,
                                             "ci_low": pl.Float64, "ci_high": pl.Float64}
                           ).select(METRIC_COLUMNS)
    metrics.write_csv(out / "metrics.csv")
    # which model each row's name stands for: a student's model card finds its own rows by this
    (out / "models.json").write_text(json.dumps(model_keys, indent=2))
    (out / "references.json").write_text(json.dumps(references, indent=2))
    for task in metrics["task"].unique(maintain_order=True).to_list():
        _plot_bars(metrics.filter(pl.col("task") == task), out / f"bars-{task}.png", task)
        _plot_ri_curve(metrics.filter(pl.col("task") == task), out / f"ri-curve-{task}.png", task)
    (out / "report.md").write_text(render_report(metrics, notes))
    from g2l_cache.layout import write_text_atomic

    write_text_atomic(out / "report.html", render_report_html(
        metrics, notes, f"{len(stems)} embedding files: {', '.join(stems)} · {k}-NN, {n_boot} bootstrap resamples"))
    return metrics


def _task_names(tasks: dict[str, list[Path]], data_names: dict[str, str]) -> dict[str, str]:
    names, seen = {}, set()
    for fp in tasks:
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in data_names[fp])
        names[fp] = name if name not in seen else f"{name}-{fp[:6]}"
        seen.add(names[fp])
    return names


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}"


INTERVALS_NOTE = ("Intervals: 95% bootstrap over test groups where the task has a group column, else over "
                  "test tiles (see each task's notes). ri: PathoROB robustness index (croma), "
                  "k chosen by kNN balanced accuracy (the curve over k is drawn); mari: croma's margin-aware "
                  "RI; apd: PathoROB's average performance drop (closer to 0 is more robust); "
                  "ri_ratio: de Jong's SO/OS ratio at fixed k.")


def report_sections(metrics: pl.DataFrame, notes: dict[str, list[str]]) -> list[dict]:
    """Per task: its notes, one table of models x metrics (value [95% interval]) and its pictures,
    as both report.md and report.html show them."""
    sections = []
    for task in metrics["task"].unique(maintain_order=True).to_list():
        m = metrics.filter(pl.col("task") == task)
        # ri_ratio is reported at fixed k (one column each); ri's k is chosen per model (in the cell).
        keys = [(metric, k if metric == "ri_ratio" else None)
                for metric, k in m.select("metric", "k").unique(maintain_order=True).rows()
                if metric != "ri_curve"]  # drawn in ri-curve-TASK.png
        keys = list(dict.fromkeys(keys))
        header = ["model"] + [metric + (f" (k={k})" if k is not None else "") for metric, k in keys]
        rows = []
        for model in m["model"].unique(maintain_order=True).to_list():
            cells = [model]
            for metric, k in keys:
                r = m.filter((pl.col("model") == model) & (pl.col("metric") == metric))
                if k is not None:
                    r = r.filter(pl.col("k") == k)
                if r.height == 0:
                    cells.append("")
                    continue
                row = r.row(0, named=True)
                ci = f" [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]" if row["ci_low"] is not None else ""
                chosen_k = f" (k={row['k']})" if metric in ("ri", "mari") else ""
                cells.append(_fmt(row["value"]) + ci + chosen_k)
            rows.append(cells)
        images = [("metrics", f"bars-{task}.png")]
        if "ri_curve" in set(m["metric"]):
            images.append(("RI over k", f"ri-curve-{task}.png"))
        images.append(("embedding map", f"map-{task}.png"))
        sections.append({"task": task, "notes": notes.get(task, []), "header": header, "rows": rows,
                         "images": images})
    return sections


def render_report(metrics: pl.DataFrame, notes: dict[str, list[str]]) -> str:
    """Markdown: per task, one table of models x metrics with 95% intervals, then the pictures."""
    lines = ["# g2l evaluation report", ""]
    for section in report_sections(metrics, notes):
        lines += [f"## {section['task']}", ""]
        lines += [f"> note: {note}" for note in section["notes"]]
        header = section["header"]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in section["rows"]]
        for alt, src in section["images"]:
            lines += ["", f"![{alt}]({src})", ""]
    lines += [INTERVALS_NOTE, ""]
    return "\n".join(lines)


def render_report_html(metrics: pl.DataFrame, notes: dict[str, list[str]], subtitle: str) -> str:
    """The same report as one HTML page (pictures beside it in the folder, linked relatively)."""
    from g2l_cache.html_page import esc, linked_image, page, table

    body = []
    for section in report_sections(metrics, notes):
        body.append(f"<h2>{esc(section['task'])}</h2>")
        body += [f"<p class=note>note: {esc(note)}</p>" for note in section["notes"]]
        body.append(table(section["header"], section["rows"]))
        body += [f"<figure>{linked_image(src, alt)}<figcaption>{esc(alt)}</figcaption></figure>"
                 for alt, src in section["images"]]
    body.append(f"<p class=note>{esc(INTERVALS_NOTE)}</p>")
    return page("g2l evaluation report", subtitle, "\n".join(body))


def _plot_bars(m: pl.DataFrame, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = m["model"].unique(maintain_order=True).to_list()
    metrics = [x for x in BAR_METRICS if x in set(m["metric"])]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 3.6), dpi=100)
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        vals, lo, hi = [], [], []
        for metric in metrics:
            r = m.filter((pl.col("model") == model) & (pl.col("metric") == metric)).row(0, named=True)
            vals.append(r["value"])
            # a group bootstrap's percentile interval need not contain the estimate: clip the bar
            lo.append(max(0.0, r["value"] - r["ci_low"]) if r["ci_low"] is not None else 0)
            hi.append(max(0.0, r["ci_high"] - r["value"]) if r["ci_high"] is not None else 0)
        xs = np.arange(len(metrics)) + i * width
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=model)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(models) - 1) / 2)
    ax.set_xticklabels([x.replace("_", "\n") for x in metrics], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(task)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_ri_curve(m: pl.DataFrame, path: Path, task: str) -> None:
    """RI over k per model, the k croma chose marked: a model robust only at one k shows here."""
    curve = m.filter(pl.col("metric") == "ri_curve")
    if curve.height == 0:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    for model in curve["model"].unique(maintain_order=True).to_list():
        c = curve.filter(pl.col("model") == model).sort("k")
        line, = ax.plot(c["k"].to_list(), c["value"].to_list(), marker=".", label=model)
        chosen = m.filter((pl.col("model") == model) & (pl.col("metric") == "ri")).row(0, named=True)
        ax.plot([chosen["k"]], [chosen["value"]], marker="o", ms=9, mfc="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("RI")
    ax.set_title(f"{task}: robustness index over k (circle: chosen k)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def project_2d(x: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates: UMAP if asked for (or 'auto' and installed), else PCA."""
    if method in ("umap", "auto"):
        try:
            import umap

            return umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(x), "UMAP"
        except ImportError:
            if method == "umap":
                raise G2LError("--map umap needs the umap-learn package (pip install umap-learn).") from None
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T, "PCA"


def _plot_maps(models: list[Embeddings], path: Path, method: str, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour_by = [c for c in ("label", "center") if c in models[0].table.columns]
    fig, axes = plt.subplots(len(colour_by), len(models), figsize=(3.2 * len(models), 3 * len(colour_by)),
                             dpi=100, squeeze=False)
    # a seeded sample of at most MAP_POINTS tiles: a map of more is unreadable and costs memory
    n = len(models[0].vectors)
    shown = np.sort(np.random.default_rng(seed).choice(n, MAP_POINTS, replace=False)) if n > MAP_POINTS else slice(None)
    for j, e in enumerate(models):
        xy, how = project_2d(e.vectors[shown], method, seed)
        for i, col in enumerate(colour_by):
            ax = axes[i][j]
            values = e.table[col].cast(pl.Utf8).to_numpy()[shown]
            for v in np.unique(values):
                sel = values == v
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, label=v)
            ax.set_title(f"{e.path.stem}: {col} ({how})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == len(models) - 1:
                ax.legend(fontsize=6, markerscale=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
