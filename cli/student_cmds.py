"""`g2l student ...`: fit, export, report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import console, data_wait_text, handle_errors
from cli.options import config_command

app = typer.Typer(help="Stage two: train the student against a cache, export it, report fidelity.",
                  no_args_is_help=True, rich_markup_mode=None)


def _fit(values: dict) -> None:
    from g2l_student.config import FitConfig
    from g2l_student.train import fit as run_fit

    cfg = FitConfig.resolved(values)
    result = run_fit(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        why = {"steps": "finished", "early-stop": "early stop"}.get(result.stopped, result.stopped)
        console.print(f"run {result.run}: {result.steps} steps ({why}), final loss "
                      f"{result.final_loss if result.final_loss is None else round(result.final_loss, 4)}",
                      soft_wrap=True, markup=False)
        console.print(f"speed: {result.steps_per_second:.2f} steps/s; waiting for data "
                      f"{data_wait_text(result.data_wait_share)}")
        if result.checkpoints and result.checkpoints["saved"]:
            saves = result.checkpoints
            console.print(f"checkpoints: {saves['saved']} saved; training held {saves['held_seconds']:.2f} s by "
                          f"them, written in {saves['written_seconds']:.2f} s behind it")
        _print_fidelity(result.fidelity)
        console.print(f"exported student: {result.export}", soft_wrap=True, markup=False)


def _fit_command():
    from g2l_student.config import FitConfig

    return config_command(FitConfig, "fit", _fit, """Train a timm student (plus projection heads) against the cache's teacher targets.

    Under `accelerate launch` / `torchrun` the global batch is split over processes. Writes the
    resolved config, metrics.csv, loss.png, checkpoints and export/ into --out. Every option is
    also a key of --config FILE.toml ([fit] table) and of --set.
    """)


app.command("fit")(handle_errors(_fit_command()))


FIDELITY_ROWS = ("projected_cosine", "projected_r2", "projected_cka", "projected_cka_debiased",
                 "projected_knn10_overlap", "backbone_cka", "backbone_cka_debiased",
                 "backbone_knn10_overlap", "views")


def _print_fidelity(data: dict) -> None:
    if not data:
        return
    table = Table(title=f"fidelity to the teacher ({data.get('split', '?')} slides)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = data.get("before", {}), data.get("after", {})
    # several teachers: every key but "views" is "LABEL:metric"
    labels = list(dict.fromkeys(k.split(":")[0] for k in {**before, **after} if ":" in k))
    keys = [f"{label}:{k}" for label in labels for k in FIDELITY_ROWS if k != "views"] + ["views"] \
        if labels else FIDELITY_ROWS
    for key in keys:
        fmt = lambda d: "-" if d.get(key) is None else (str(d[key]) if key == "views" else f"{d[key]:.4f}")  # noqa: E731
        table.add_row(key if ":" in key else key.replace("_", " ", 1), fmt(before), fmt(after))
    console.print(table)


@app.command("export")
@handle_errors
def export(run: Path = typer.Argument(..., help="Run folder."),
           checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint folder.  [default: the last]"),
           evaluation: Optional[list[Path]] = typer.Option(None, help="A `g2l eval compare` report folder "
                                                           "that embedded this export (repeatable): its rows "
                                                           "go into the model card."),
           device: Optional[str] = typer.Option(None, help="Where the speed line is measured (cuda, cuda:1, "
                                                "cpu).  [default: a GPU if there is one]"),
           speed: bool = typer.Option(True, help="Measure images per second of the student and its teachers "
                                      "for the model card (random weights, batch 64).")) -> None:
    """Write RUN/export/: student.safetensors + config.json for plain timm, head.safetensors, hf/ (a
    transformers checkpoint, for a DINOv2-architecture student) and the model card README.md
    (teachers, data, recipe, fidelity, evaluation rows, speed beside the teacher's, cost ledger)."""
    from g2l_student.export import export_run

    out = export_run(run, checkpoint, evaluation or [], device, speed)
    console.print(f"exported to {out} (model card: {out / 'README.md'})", markup=False)
    console.print((out / "LOAD.md").read_text(), markup=False, soft_wrap=True)  # paths stay copyable


@app.command("report")
@handle_errors
def report(run: Path = typer.Argument(..., help="Run folder.")) -> None:
    """Fidelity on the validation slides (cosine, centred R², linear and debiased CKA, 10-NN overlap,
    before and after) and the cost ledger: the fit's time and the teacher inference it reused."""
    from g2l_student.export import fidelity_report
    from g2l_student.ledger import run_ledger

    _print_fidelity(fidelity_report(run))
    print_ledger([run_ledger(run)])


def print_ledger(runs: list[dict], paid: dict | None = None) -> None:
    """One row per run: its fit time, and the teacher inference it reused from its cache."""
    from g2l_student.ledger import hours, reused_text, unrecorded_note

    table = Table(title="cost ledger")
    for column in ("run", "fit (device time)", "views trained", "teacher inference reused",
                   "online, the same views would run the teacher"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in runs:
        table.add_row(Path(r["run"]).name, f"{hours(r['fit_device_seconds'])} on {', '.join(r['fit_devices']) or '-'}",
                      str(r["views_trained"]), reused_text(r["teacher_seconds_reused"], r["teachers_unrecorded"]),
                      reused_text(r["online_equivalent_seconds"], r["teachers_unrecorded"]))
    console.print(table)
    unrecorded = paid["teachers_unrecorded"] if paid is not None else sorted({n for r in runs for n in r["teachers_unrecorded"]})
    if paid is not None and (paid["teacher_seconds_paid"] or not unrecorded):
        console.print(f"teacher inference paid once: {reused_text(paid['teacher_seconds_paid'], unrecorded)}; reused by "
                      f"{len(runs)} fit(s): {reused_text(paid['teacher_seconds_reused'], unrecorded)} in all; online "
                      "distillation of the same views would have run the teacher for "
                      f"{reused_text(paid['online_equivalent_seconds'], unrecorded)}.", markup=False)
    if unrecorded:
        console.print(unrecorded_note(unrecorded), markup=False)
