"""`g2l student ...`: fit, export, report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from g2l_cache.errors import G2LError
from cli.common import console, data_wait_text, handle_errors, load_toml, merge_options

app = typer.Typer(help="Stage two: train the student against a cache, export it, report fidelity.",
                  no_args_is_help=True)


@app.command("fit")
@handle_errors
def fit(
    cache: Optional[Path] = typer.Argument(None, help="Cache folder written by `g2l cache build`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (new, or --resume / --overwrite)."),
    student: Optional[str] = typer.Option(None, help="timm architecture (default vit_large_patch14_reg4_dinov2)."),
    student_weights: Optional[Path] = typer.Option(None, help="Initial weights: a .safetensors file (common "
                                                   "checkpoint layouts are mapped to timm keys), or a "
                                                   "transformers DINOv2 checkpoint (folder or hub id, e.g. "
                                                   "histai/hibou-L) mapped onto the timm ViT."),
    student_mean: Optional[str] = typer.Option(None, help="Student input mean R,G,B (default: the weights' "
                                               "preprocessor_config.json, else timm's)."),
    student_std: Optional[str] = typer.Option(None, help="Student input std R,G,B (default as for the mean)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random student weights."),
    head_weights: Optional[Path] = typer.Option(None, help="Projection heads from an earlier export (head.safetensors)."),
    head_init: Optional[str] = typer.Option(None, help="'targets' (default): heads start at the training "
                                            "targets' per-dimension mean and sd; 'default': torch's init."),
    img_size: Optional[int] = typer.Option(None, help="Student input size; views are resized to it (default 224)."),
    teacher: Optional[str] = typer.Option(None, help="Which cache teacher (fingerprint or name); default: the first complete."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps (or use --epochs)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs over the training tiles (default 1 if no --steps)."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch per micro-step, split over processes (default 32)."),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate (default 1e-4)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default 0.05)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warmup steps before the cosine (default 5%)."),
    loss: Optional[str] = typer.Option(None, help="logsum (G2L, default), cosine, smooth-l1 or mse."),
    alpha: Optional[float] = typer.Option(None, help="Exponent of the logsum loss (default 4)."),
    target: Optional[str] = typer.Option(None, help="cls (teacher embedding, default), mean-patch, or both."),
    cls_weight: Optional[float] = typer.Option(None, help="Weight of the cls target with --target both."),
    patch_weight: Optional[float] = typer.Option(None, help="Weight of the mean-patch target with --target both."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm (default 1.0; 0 = off)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimiser step (default 1)."),
    ema_decay: Optional[float] = typer.Option(None, help="Keep an EMA of the student (e.g. 0.999); exported if set."),
    early_stop: Optional[str] = typer.Option(None, help="'g2l': once the smoothed loss exceeds its 100-step mean >10 times in a "
                                            "row (never in the first 10% of steps), cool the learning rate down to 0 "
                                            "over 2% of the steps and stop. Tune with early_stop_* keys in --config."),
    logsum_over: Optional[str] = typer.Option(None, help="Log-sum loss: 'sample' (log of each sample's sum, then "
                                              "the mean; default) or 'batch' (log of the sum over the whole batch)."),
    seed: Optional[int] = typer.Option(None, help="Seed for split, view choice, order and init (default 0)."),
    val_fraction: Optional[float] = typer.Option(None, help="Share of patients (TCGA barcodes or --patient-of), "
                                                 "else of slides, held out for validation (default 0.1)."),
    patient_of: Optional[Path] = typer.Option(None, help="CSV with slide_id,patient_id: a patient's slides stay "
                                              "on one side of the validation split."),
    val_every: Optional[int] = typer.Option(None, help="Measure fidelity on the held-out views every N steps "
                                            "(metrics.csv val_* columns, plotted in loss.png)."),
    views_per_epoch: Optional[str] = typer.Option(None, help="'one' cached view per tile per epoch (default) or 'all'."),
    slides: Optional[Path] = typer.Option(None, "--slides", help="Only these slides: text file of ids or CSV with slide_id."),
    where: Optional[str] = typer.Option(None, help="SQL condition on view/tile/slide columns, e.g. \"slide_id LIKE '%centre-a%'\"."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers per process (default 2)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (default 500)."),
    online_teacher: Optional[str] = typer.Option(None, help="Compute targets live with this teacher (baseline / check)."),
    online_teacher_weights: Optional[Path] = typer.Option(None, help="Weights for --online-teacher."),
    online_random_init: bool = typer.Option(False, "--online-random-init", help="Random weights for --online-teacher."),
    fresh_views: bool = typer.Option(False, "--fresh-views", help="With --online-teacher: every epoch draws a new "
                                     "view of each training tile (view index K + epoch, from the stored tile) "
                                     "instead of a cached one: the paper's online baseline."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out."),
    cpu: bool = typer.Option(False, "--cpu", help="Train on CPU even if a GPU is present."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    config: Optional[Path] = typer.Option(None, help="TOML file with any of these options ([fit] table or top level)."),
) -> None:
    """Train a timm student (plus projection head) against the cache's teacher targets.

    Under `accelerate launch` / `torchrun` the global batch is split over processes. Writes the
    resolved config, metrics.csv, loss.png, checkpoints and export/ into --out.
    """
    from g2l_student.config import FitConfig
    from g2l_student.train import fit as run_fit

    p = lambda v: str(v) if v else None  # noqa: E731
    values = merge_options(load_toml(config, "fit"), cache=p(cache), out=p(out), student=student,
                           student_weights=p(student_weights), random_init=random_init,
                           student_mean=_triple(student_mean, "--student-mean"),
                           student_std=_triple(student_std, "--student-std"),
                           head_weights=p(head_weights), head_init=head_init, img_size=img_size, teacher=teacher,
                           steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, warmup_steps=warmup_steps, loss=loss,
                           alpha=alpha, target=target, cls_weight=cls_weight,
                           patch_weight=patch_weight, grad_clip=grad_clip, grad_accum=grad_accum,
                           ema_decay=ema_decay, early_stop=early_stop, logsum_over=logsum_over, seed=seed,
                           val_fraction=val_fraction, patient_of=p(patient_of), val_every=val_every, views_per_epoch=views_per_epoch,
                           slides=p(slides), where=where, num_workers=num_workers,
                           checkpoint_every=checkpoint_every, online_teacher=online_teacher,
                           online_teacher_weights=p(online_teacher_weights),
                           online_random_init=online_random_init, fresh_views=fresh_views, resume=resume,
                           overwrite=overwrite, cpu=cpu)
    for required in ("out",) if resume else ("cache", "out"):
        if not values.get(required):
            raise typer.BadParameter(f"{'CACHE' if required == 'cache' else '--out'} is required.")
    if no_progress:
        values["progress"] = False
    result = run_fit(FitConfig.for_resume(values) if values.get("resume") else FitConfig.from_dict(values))
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"run {result.run}: {result.steps} steps ({result.stopped}), final loss "
                      f"{result.final_loss if result.final_loss is None else round(result.final_loss, 4)}")
        console.print(f"speed: {result.steps_per_second:.2f} steps/s; waiting for data "
                      f"{data_wait_text(result.data_wait_share)}")
        _print_fidelity(result.fidelity)
        console.print(f"exported student: {result.export}")


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
    for key in FIDELITY_ROWS:
        fmt = lambda d: "-" if d.get(key) is None else (str(d[key]) if key == "views" else f"{d[key]:.4f}")  # noqa: E731
        table.add_row(key.replace("_", " ", 1), fmt(before), fmt(after))
    console.print(table)


@app.command("export")
@handle_errors
def export(run: Path = typer.Argument(..., help="Run folder."),
           checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint folder (default: the last).")) -> None:
    """Write RUN/export/: student.safetensors + config.json for plain timm, and head.safetensors."""
    from g2l_student.export import export_run

    out = export_run(run, checkpoint)
    console.print(f"exported to {out}")
    console.print((out / "LOAD.md").read_text())


@app.command("report")
@handle_errors
def report(run: Path = typer.Argument(..., help="Run folder.")) -> None:
    """Fidelity on the validation slides: cosine, centred R², linear and debiased CKA, 10-NN overlap, before and after."""
    from g2l_student.export import fidelity_report

    _print_fidelity(fidelity_report(run))


def _triple(text: str | None, option: str) -> list[float] | None:
    """'0.7,0.58,0.7' -> [0.7, 0.58, 0.7]."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise G2LError(f"{option} takes three numbers separated by commas, got {text!r}.") from None
    if len(values) != 3:
        raise G2LError(f"{option} takes three numbers (R,G,B), got {text!r}.")
    return values
