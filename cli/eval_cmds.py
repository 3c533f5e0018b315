"""`g2l embed` and `g2l eval ...`: embed labelled tiles with any model, compare models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import console, handle_errors

app = typer.Typer(help="Evaluate embeddings the way the G2L paper does (kNN, linear probe, CKA, RI).",
                  no_args_is_help=True, rich_markup_mode=None)


@handle_errors
def embed(model: str = typer.Argument(..., help="Teacher preset, student run folder / export folder / "
                                      "student.safetensors, or any timm model name."),
          data: Path = typer.Argument(..., help="Folder of class sub-folders, or CSV with path,label "
                                      "[,split,center,group]."),
          out: Path = typer.Option(..., "--out", "-o", help="Output Parquet file."),
          mpp: Optional[float] = typer.Option(None, help="mpp of the tiles; they are rescaled to the model's mpp."),
          random_init: bool = typer.Option(False, "--random-init", help="Random weights (tests)."),
          weights: Optional[Path] = typer.Option(None, help="Local weights for a preset / timm model."),
          img_size: Optional[int] = typer.Option(None, help="Model input size.  [default: the model's]"),
          batch_size: int = typer.Option(32, help="Tiles per forward pass."),
          num_workers: int = typer.Option(0, help="DataLoader workers reading tiles."),
          seed: int = typer.Option(0, help="Seed for --random-init."),
          precision: str = typer.Option("auto", help="Compute precision of a teacher preset or timm model: "
                                        "auto (fp16 on a GPU, fp32 on a CPU), fp16, bf16 or fp32, as `cache build "
                                        "--precision`."),
          cpu: bool = typer.Option(False, "--cpu", help="CPU even if a GPU is present.")) -> None:
    """Embed every tile of DATA with MODEL into one Parquet row each (cached: re-runs are free)."""
    import torch

    from g2l_student.evaluation.embedder import embed_tileset, load_embedding_model, load_tileset

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    tiles = load_tileset(data)
    net = load_embedding_model(model, random_init, str(weights) if weights else None, img_size, device, seed,
                               precision)
    wrote = embed_tileset(net, tiles, out, mpp, batch_size, num_workers)
    console.print(f"{'wrote' if wrote else 'up to date (cached)'}: {out} "
                  f"({tiles.table.height} tiles, model {net.name})")


@app.command("compare")
@handle_errors
def compare(embeddings: list[Path] = typer.Argument(..., help="Files written by `g2l embed`; the file "
                                                    "name is the model's name in the report."),
            out: Path = typer.Option(..., "--out", "-o", help="Report folder."),
            k: int = typer.Option(20, help="Neighbours for kNN classification."),
            bootstrap: int = typer.Option(1000, help="Bootstrap resamples for 95% intervals."),
            seed: int = typer.Option(0, help="Seed for splits and bootstrap."),
            map_method: str = typer.Option("auto", "--map", help="2-D map: auto (UMAP if installed), umap or pca."),
            apd_iterations: int = typer.Option(20, help="Replicates of PathoROB's APD probe sweep (20 as "
                                               "PathoROB; 0 skips APD). Run only on 2-centre x 2-class sets."),
            reference: Optional[str] = typer.Option(None, help="The model every *_vs_ row (CKA, 10-NN overlap) is "
                                                    "measured against: an embedding file, its name without "
                                                    ".parquet, or the model name it was embedded with (a shell glob "
                                                    "sorts files by name).  [default: the first file given]")) -> None:
    """kNN, linear probe (with 95% CIs), CKA and robustness (RI, its curve over k, MaRI, APD) per model;
    report.html (one page: open it in a browser), report.md, metrics.csv, PNGs."""
    import polars as pl

    from g2l_student.evaluation.compare import compare as run_compare

    metrics = run_compare([str(e) for e in embeddings], out, k, bootstrap, seed, map_method, apd_iterations,
                          reference)
    for task, path in json.loads((Path(out) / "references.json").read_text()).items():
        console.print(f"{task}: *_vs_ rows are measured against {Path(path).stem} ({path})", markup=False)
    groups = {"classification": ("knn_balanced_accuracy", "linear_balanced_accuracy", "linear_auroc"),
              "robustness to centres": ("ri", "mari", "apd", "ri_ratio"), "similarity": ("_vs_",)}
    labels = {"knn_balanced_accuracy": "kNN bal.acc", "linear_balanced_accuracy": "lin bal.acc",
              "linear_auroc": "lin AUROC", "ri": "RI", "mari": "MaRI", "apd": "APD", "ri_ratio": "RI ratio"}
    for task in metrics["task"].unique(maintain_order=True).to_list():
        m = metrics.filter(pl.col("task") == task)
        for group, names in groups.items():  # one narrow table per group: readable in 80 columns
            cols = [(name, kk) for name, kk in m.select("metric", "k").unique(maintain_order=True).rows()
                    if name in names or (names == ("_vs_",) and "_vs_" in name)]
            cols = list(dict.fromkeys((n, kk if n == "ri_ratio" else None) for n, kk in cols))
            if not cols:
                continue
            table = Table(title=f"g2l eval {task}: {group}")
            table.add_column("model")
            for name, kk in cols:
                label = labels.get(name, name.replace("cka_debiased_vs_", "dCKA vs ").replace("cka_vs_", "CKA vs ")
                                   .replace("knn10_overlap_vs_", "10-NN vs "))
                table.add_column(label + (f" k{kk}" if kk else ""), justify="right")
            for model in m["model"].unique(maintain_order=True).to_list():
                cells = []
                for name, kk in cols:
                    r = m.filter((pl.col("model") == model) & (pl.col("metric") == name))
                    if kk is not None:
                        r = r.filter(pl.col("k") == kk)
                    cells.append(f"{r['value'][0]:.3f}" if r.height else "")
                table.add_row(model, *cells)
            console.print(table)
    console.print(f"report: {Path(out) / 'report.html'} (and report.md)  metrics: {Path(out) / 'metrics.csv'}")


@app.command("cka")
@handle_errors
def cka(a: Path = typer.Argument(..., help="Embedding file of model A."),
        b: Path = typer.Argument(..., help="Embedding file of model B (same tiles).")) -> None:
    """Linear CKA, debiased CKA and 10-NN overlap between two models' embeddings of the same tiles."""
    from g2l_student.evaluation.compare import similarity_between
    from g2l_student.evaluation.embedder import read_embeddings

    for name, value in similarity_between(read_embeddings(a), read_embeddings(b)).items():
        console.print(f"{name} {a.stem} vs {b.stem}: {value:.4f}")
