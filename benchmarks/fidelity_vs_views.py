"""(K) How many cached views per tile: held-out fidelity against step for students trained on the
first K cached views of each tile (K = 1, 2, 4, 8) and for the online baseline that draws a new
view of every tile each epoch (`--online-teacher --fresh-views`).

Same student, steps, seed, split and held-out views (all cached views of the validation tiles)
in every run; only the training views differ. Writes results/fidelity_vs_views.json and .png.
CPU defaults (ViT-S teacher at 112 px, ViT-Ti student at 64 px, 8 slides x 48 tiles, 250 steps)
aim at 15 minutes on 2 cores; pass --teacher/--student/--device/--student-size/--steps for the
real study on a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

from _common import WORK, bench_cache, device_name, fresh, parser, save

CURVES = ("val_projected_r2", "val_projected_cka_debiased", "val_backbone_cka_debiased",
          "val_backbone_knn10_overlap", "val_projected_cosine")


def held_out_slides(cache: Path, val_fraction: float, seed: int) -> list[str]:
    """The validation slides every run of the study holds out (the fit's own seeded split)."""
    from g2l_cache import CacheReader
    from g2l_student.data import split_by_slide

    slides = CacheReader(str(cache)).slides()
    return split_by_slide(slides.filter(slides["status"] == "ok")["slide_id"].to_list(), val_fraction, seed)[1]


def run_config(args, cache: Path, out: Path, where: str, **extra):
    from g2l_student.config import FitConfig

    return FitConfig(cache=str(cache), out=str(out), student=args.student, random_init=True,
                     img_size=args.student_size, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, num_workers=args.workers, val_fraction=args.val_fraction,
                     val_every=max(1, args.steps // args.points), where=where,
                     checkpoint_every=10**9, fidelity_views=args.fidelity_views, progress=False,
                     seed=args.seed, cpu=not args.device.startswith("cuda"), **extra)


def curves(run: Path) -> dict:
    from g2l_student.rundir import RunDir

    rows = [r for r in RunDir(run).read_metrics() if r["val_projected_r2"]]
    return {"step": [int(r["step"]) for r in rows], **{c: [float(r[c]) for r in rows] for c in CURVES}}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100)
    for (name, run), colour in zip(results.items(), plt.cm.viridis_r([0.15, 0.35, 0.55, 0.75, 0.95])):
        style = dict(color="tab:red", ls="--") if name == "fresh" else dict(color=colour)
        for ax, key in zip(axes, ("val_projected_r2", "val_projected_cka_debiased", "val_backbone_knn10_overlap")):
            ax.plot(run["curve"]["step"], run["curve"][key], marker="o", ms=3, label=name, **style)
    for ax, title in zip(axes, ("projected centred R²", "projected debiased CKA", "backbone 10-NN overlap")):
        ax.set_title(f"held-out {title}")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(slides=8, tiles_per_slide=48, views=8)
    p.add_argument("--student-size", type=int, default=64, help="student input px (real runs: 224)")
    p.add_argument("--steps", type=int, default=250, help="optimiser steps per run (README table: 400)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--points", type=int, default=5, help="held-out measurements per run")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--fidelity-views", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ks", default="1,2,4,8", help="cached views per tile to compare (each <= --views)")
    args = p.parse_args()
    from g2l_student.train import fit

    ks = [int(k) for k in args.ks.split(",")]
    if max(ks) > args.views:
        p.error(f"--ks up to {max(ks)} needs a cache with --views >= {max(ks)}")
    cache = bench_cache(args)
    val = held_out_slides(cache, args.val_fraction, args.seed)
    keep_val = " OR slide_id IN (" + ", ".join(f"'{s}'" for s in val) + ")"
    results = {}
    for k in ks:
        started = time.perf_counter()
        out = fresh(WORK / f"views-K{k}")
        fit(run_config(args, cache, out, f"view_index < {k}{keep_val}"))
        results[f"K={k}"] = {"views_per_tile": k, "seconds": time.perf_counter() - started, "curve": curves(out)}
    started = time.perf_counter()
    out = fresh(WORK / "views-fresh")
    # Fresh views start from the same cached views (view 0 of each tile drives the first epoch's
    # selection) and then draw view K + epoch: one never-seen view of every tile per epoch.
    fit(run_config(args, cache, out, f"view_index < 1{keep_val}", online_teacher=args.teacher,
                   online_random_init=True, fresh_views=True))
    results["fresh"] = {"views_per_tile": None, "seconds": time.perf_counter() - started, "curve": curves(out)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot(results, Path(args.out) / "fidelity_vs_views.png")
    final = {name: {key.removeprefix("val_"): r["curve"][key][-1] for key in CURVES} for name, r in results.items()}
    save("fidelity_vs_views", {
        "device": device_name(args.device), "teacher": args.teacher, "student": args.student,
        "teacher_px": args.crop_size, "student_px": args.student_size, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "val_slides": val,
        "final": final, "runs": results,
    }, args.out)


if __name__ == "__main__":
    main()
