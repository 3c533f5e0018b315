"""`g2l cache ...`: build, info, verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import console, data_wait_text, handle_errors
from cli.options import config_command

app = typer.Typer(help="Stage one: run the teacher once over tiled slides and cache its targets.",
                  no_args_is_help=True, rich_markup_mode=None)


def _build(values: dict) -> None:
    import os

    from g2l_cache.build import config_from_dict, run_build

    cfg = config_from_dict(values)
    summary = run_build(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    if not summary.succeeded(cfg.strict):
        raise typer.Exit(1)


def _build_command():
    from g2l_cache.build import BuildConfig

    return config_command(BuildConfig, "build", _build, """Tile slides, make K augmented views per tile, run the teacher, and cache the targets.

    Re-running resumes; with another --teacher it adds that teacher's targets for the same views
    without reading slides again (SLIDES and the tiling/view options may then be left out: they
    default to the cache's). Works under torchrun / accelerate launch: slides are sharded across
    processes. Every option is also a key of --config FILE.toml ([build] table) and of --set.
    """)


app.command("build")(handle_errors(_build_command()))


def _print_summary(summary) -> None:
    table = Table(title="g2l cache build", show_header=False)
    table.add_row("cache", summary.cache)
    table.add_row("teacher", summary.teacher_fingerprint)
    table.add_row("slides ok / failed", f"{summary.slides_ok} / {summary.slides_failed}")
    table.add_row("tiles / views", f"{summary.tiles} / {summary.views}")
    table.add_row("targets written now", f"{summary.targets_written} "
                  f"({summary.views_per_second:.1f} views/s, {summary.seconds:.1f} s)")
    if summary.targets_written:
        table.add_row("teacher waiting for data", data_wait_text(summary.loader_wait_share))
    table.add_row("QC images", str(Path(summary.cache) / "qc"))
    console.print(table)
    if summary.failed:
        failed = Table(title="failed slides", show_header=True)
        failed.add_column("slide")
        failed.add_column("error")
        for slide_id, error in sorted(summary.failed.items()):
            failed.add_row(escape(slide_id), escape(error))
        console.print(failed)


@app.command("info")
@handle_errors
def info(cache: Path = typer.Argument(..., help="Cache folder."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Slides ok/failed, tiles, views, teachers, bytes on disk and bytes per view."""
    from g2l_cache.inspect import cache_info

    data = cache_info(str(cache))
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"g2l cache {data['cache']}", show_header=False)
    for key in ("status", "slides_ok", "slides_failed", "tiles", "views", "n_shards", "bytes_on_disk"):
        table.add_row(key.replace("_", " "), str(data[key]))
    bpv = data["bytes_per_view"]
    table.add_row("bytes per view", f"{bpv:.0f}" if bpv else "-")
    for fp, t in data["teachers"].items():
        table.add_row(f"teacher {fp}", f"{t['targets']} targets, dim {t['embed_dim']}+{t['patch_dim']}"
                      f"{'' if t['complete'] else ' (incomplete)'}")
    console.print(table)


@app.command("verify")
@handle_errors
def verify(cache: Path = typer.Argument(..., help="Cache folder."),
           recompute: int = typer.Option(0, help="Re-run the teacher on N random cached views and "
                                         "report the largest difference."),
           checksums: Optional[bool] = typer.Option(None, "--checksums/--no-checksums",
                                                    help="Read the whole cache and check every checksum "
                                                    "(default: on, off when --recompute is given)."),
           seed: int = typer.Option(0, help="Seed for picking the views to recompute."),
           cpu: bool = typer.Option(False, "--cpu", help="Recompute on CPU even if a GPU is present.")) -> None:
    """Check every checksum and that counts agree, or re-run the teacher on a sample; exit 1 if anything is wrong."""
    import torch

    from g2l_cache.inspect import verify_cache

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    full = checksums if checksums is not None else recompute == 0
    report = verify_cache(str(cache), recompute=recompute, seed=seed, device=device, checksums=full)
    if full:
        console.print(f"checked {report['values_checked']} index values and "
                      f"{report['data_bytes'] / 1e9:.2f} GB of tiles and targets in {report['cache']} "
                      f"({report['mb_per_second']:.0f} MB/s)", markup=False)
        for fp, n in report["target_counts"].items():
            console.print(f"  teacher {fp}: {n} targets", markup=False)
    if report["recompute"]:
        for fp, r in report["recompute"].items():
            console.print(f"  recompute {fp}: {r}", markup=False)
    if report["problems"]:
        for p in report["problems"]:
            console.print(f"problem: {p}", style="red", markup=False)
        raise typer.Exit(1)
    console.print("cache OK", style="green")
