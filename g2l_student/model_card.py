"""export/README.md: a model card in the Hugging Face style, written from what the run recorded.

Teachers with fingerprints, the slides/tiles/views used, recipe and options, steps, fidelity, the
evaluation rows of `g2l eval compare` reports that embedded this export, and the cost ledger.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl

from g2l_cache.errors import G2LError
from g2l_student.config import FitConfig
from g2l_student.ledger import hours, run_ledger, unrecorded_note
from g2l_student.rundir import FIDELITY_SUMMARY, RunDir

RECIPE_KEYS = ("student", "img_size", "target", "loss", "alpha", "logsum_over", "lr", "weight_decay",
               "batch_size", "grad_accum", "steps", "epochs", "warmup_steps", "early_stop", "ema_decay",
               "views_per_epoch", "val_fraction", "seed", "head_init")


def evaluation_rows(report_dirs: list[str | Path], fingerprint: str) -> pl.DataFrame | None:
    """Rows of `g2l eval compare` reports whose model is the student with this weights fingerprint."""
    frames = []
    for folder in report_dirs:
        folder = Path(folder)
        if not (folder / "metrics.csv").is_file() or not (folder / "models.json").is_file():
            raise G2LError(f"{folder} is not a `g2l eval compare` report (metrics.csv and models.json).")
        models = json.loads((folder / "models.json").read_text())
        mine = [name for name, m in models.items() if m.get("model_fingerprint", "").startswith(fingerprint + "-")]
        if not mine:
            raise G2LError(f"no model in {folder} was embedded from this export; embed it with `g2l embed "
                           "RUN ...` and run `g2l eval compare` again.")
        frames.append(pl.read_csv(folder / "metrics.csv").filter(pl.col("model").is_in(mine)))
    return pl.concat(frames) if frames else None


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def speed_lines(rows: list[dict]) -> list[str]:
    """The card's speed section: the student beside its teachers, and the device they ran on."""
    if not rows:
        return ["## Speed", "", "Not measured yet: `g2l student export RUN` times the student and its teachers "
                "on the machine it runs on.", ""]
    lines = ["## Speed", "", "| model | role | input px | parameters | GFLOPs / image | images / s | batch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['images_per_second']:.4g}" + ("" if r["measured"] else " (estimated)")
        lines.append(f"| {r['model']} | {r['role']} | {r['img_size']} | {r['params_m']:.1f} M | "
                     f"{r['gflops']:.4g} | {rate} | {r['batch']} |")
    student = rows[0]
    lines += ["", f"Forward passes (`forward_features`) on {student['device']}, {student['precision']}, "
              "random input, measured by `g2l student export`."]
    for r in rows[1:]:
        lines[-1] += (f" The student embeds {student['images_per_second'] / r['images_per_second']:.3g}x as many "
                      f"images per second as {r['model']}.")
        if not r["measured"]:
            lines[-1] += (f" {r['model']} was not run here (a batch would take over a minute): its rate is the "
                          "student's measured FLOP rate divided by its FLOPs per image.")
    return lines + [""]


def render_card(run_root: str | Path, export_config: dict, evaluation: pl.DataFrame | None = None) -> str:
    """The model card's Markdown."""
    run = RunDir(run_root)
    info = run.info()
    cfg = FitConfig.from_dict(run.read_config())
    ledger = run_ledger(run.root)
    fidelity = json.loads(run.fidelity.read_text()) if run.fidelity.exists() else {}
    g2l = export_config["g2l"]
    counts = info.get("data", {})
    name = run.root.name
    lines = ["---", "library_name: timm", "pipeline_tag: image-feature-extraction",
             "tags: [histopathology, pathology, knowledge-distillation, g2l]", "---", "",
             f"# {name}: {cfg.student} distilled with g2l", "",
             f"A `{cfg.student}` student ({cfg.img_size} px input) trained by `g2l student fit` to reproduce "
             f"{'its teacher' if len(ledger['teachers']) == 1 else 'several teachers'} on cached views of "
             "one cancer's slides (the G2L recipe, arXiv 2510.11176). Load it with plain timm: see LOAD.md.", "",
             "## Teachers", "", "| head prefix | teacher | fingerprint | dims (embedding + mean patch) | targets |",
             "|---|---|---|---|---|"]
    for t in ledger["teachers"]:
        source = "computed live during the fit" if t.get("live") else "cached once, replayed"
        prefix = t["label"] + ":" if len(ledger["teachers"]) > 1 else "(none)"
        lines.append(f"| {prefix} | {t.get('name', '?')} | `{t.get('fingerprint', '?')}` | "
                     f"{t['embed_dim']} + {t['patch_dim']} | {source} |")
    split = fidelity.get("split", "validation")
    lines += ["", "## Data", "",
              f"- cache: `{info['cache']}` (fingerprint `{info['cache_fingerprint']}`), tiles read at "
              f"{_fmt(g2l.get('mpp'))} mpp",
              f"- training split: {_fmt(counts.get('train_slides'))} slides, {_fmt(counts.get('train_tiles'))} tiles, "
              f"{_fmt(counts.get('train_views'))} cached views; {ledger['views_trained']} views drawn over "
              f"{info.get('steps')} steps ({cfg.batch_size * cfg.grad_accum} per step)",
              f"- held out: {len(fidelity.get('val_slides', []))} slides, split by {fidelity.get('split_by', 'slide')}"
              + (f"; selection: --slides {cfg.slides}" if cfg.slides else "")
              + (f"; --where {cfg.where}" if cfg.where else ""),
              "", "## Recipe", "", "| option | value |", "|---|---|"]
    values = cfg.to_dict()
    lines += [f"| {k} | {_fmt(values[k])} |" for k in RECIPE_KEYS if values.get(k) is not None]
    why = {"steps": "at the end of its step budget", "early-stop": "by the G2L early-stop rule"}
    lines += ["", f"Trained {info.get('steps')} steps, stopped {why.get(info.get('stopped'), info.get('stopped'))}. "
              "Every option: the run's config.toml.", "", f"## Fidelity to the teacher ({split} views)", ""]
    before, after = fidelity.get("before", {}), fidelity.get("after", {})
    keys = [k for k in after if k != "views" and k.split(":")[-1] in FIDELITY_SUMMARY] or list(FIDELITY_SUMMARY)
    lines += ["| metric | before training | after |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in keys]
    lines += [f"| views | {_fmt(before.get('views'))} | {_fmt(after.get('views'))} |", ""]
    if evaluation is not None and evaluation.height:
        lines += ["## Evaluation (`g2l eval compare`)", "", "| task | metric | k | value | 95% interval |",
                  "|---|---|---|---|---|"]
        for r in evaluation.filter(pl.col("metric") != "ri_curve").iter_rows(named=True):
            ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r["ci_low"] is not None else "-"
            lines.append(f"| {r['task']} | {r['metric']} | {_fmt(r['k'])} | {_fmt(r['value'])} | {ci} |")
        lines.append("")
    lines += speed_lines(g2l.get("speed") or [])
    lines += ["## Cost ledger", "", "| what | device time | on |", "|---|---|---|"]
    for t in ledger["teachers"]:
        if not t.get("live"):
            views, paid = ((f"{t['cache_views']} cached views", hours(t["cache_device_seconds"])) if t.get("cache_views")
                           else ("the cached views", "not recorded"))
            lines.append(f"| teacher {t.get('name')}: inference on {views}, paid once "
                         f"by `g2l cache build` | {paid} | {', '.join(t.get('devices', [])) or '-'} |")
    lines.append(f"| this fit: {ledger['sessions']} session(s), {ledger['views_trained']} views | "
                 f"{hours(ledger['fit_device_seconds'])} | {', '.join(ledger['fit_devices']) or '-'} |")
    if ledger["teacher_seconds_reused"]:
        lines += ["", f"This student reused {hours(ledger['teacher_seconds_reused'])} of teacher inference from "
                  f"the cache; distilling its {ledger['views_trained']} training views online would have run the "
                  f"teacher for {hours(ledger['online_equivalent_seconds'])} during the fit instead."]
    if ledger["teachers_unrecorded"]:
        lines += ["", unrecorded_note(ledger["teachers_unrecorded"])]
    lines.append("")
    return "\n".join(lines)
