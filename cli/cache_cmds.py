"""`g2l cache ...`: build, info, verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import console, data_wait_text, handle_errors, load_toml, merge_options

app = typer.Typer(help="Stage one: run the teacher once over tiled slides and cache its targets.",
                  no_args_is_help=True)


@app.command("build")
@handle_errors
def build(
    slides: list[Path] = typer.Argument(None, help="Slide files, folders of slides, or a CSV with a "
                                        "'path' column (optional 'slide_id', 'mpp'). May be omitted "
                                        "when adding a teacher to an existing cache."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache folder (created, resumed, or extended)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher preset (h-optimus-0, h-optimus-1, h0-mini, "
                                          "prov-gigapath, uni, uni2-h, virchow2) or any timm model name."),
    teacher_weights: Optional[Path] = typer.Option(None, help="Local weights (.safetensors) instead of the hub."),
    random_init: bool = typer.Option(False, "--random-init", help="Random teacher weights (tests, demo)."),
    mpp: Optional[float] = typer.Option(None, help="Target microns per pixel of tiles (default 0.5)."),
    mpp_override: Optional[float] = typer.Option(None, help="Use this level-0 mpp for every slide "
                                                  "(slides without metadata; a CSV 'mpp' column wins)."),
    tile_size: Optional[int] = typer.Option(None, help="Tile side in px at --mpp (default 256)."),
    crop_size: Optional[int] = typer.Option(None, help="View crop side in px = teacher input (default 224)."),
    views: Optional[int] = typer.Option(None, help="Augmented views per tile (default 4)."),
    max_tiles_per_slide: Optional[int] = typer.Option(None, help="Seeded random subset of tiles per slide."),
    tissue_threshold: Optional[float] = typer.Option(None, help="Minimum tissue fraction of a tile (default 0.5)."),
    tissue_method: Optional[str] = typer.Option(None, help="otsu or morphological (default otsu)."),
    seed: Optional[int] = typer.Option(None, help="Seed for tile subsets, views and random init (default 0)."),
    batch_size: Optional[int] = typer.Option(None, help="Views per teacher batch (default 32)."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers reading and augmenting "
                                              "[default: cores - 1, at most 8]."),
    tile_format: Optional[str] = typer.Option(None, help="Stored tile encoding: jpeg or png (lossless) (default jpeg)."),
    jpeg_quality: Optional[int] = typer.Option(None, help="JPEG quality of stored tiles (default 95)."),
    shards: Optional[int] = typer.Option(None, help="Shards of a new cache (default 64): processes take them "
                                         "round-robin, so up to this many share a build."),
    recursive: bool = typer.Option(False, "--recursive", help="Search slide folders recursively."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any slide failed."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on CPU even if a GPU is present."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs, CI)."),
    config: Optional[Path] = typer.Option(None, help="TOML file with any of these options ([build] table or top level)."),
) -> None:
    """Tile slides, make K augmented views per tile, run the teacher, and cache the targets.

    Re-running resumes; with another --teacher it adds that teacher's targets for the same views
    without reading slides again (SLIDES and the tiling/view options may then be left out: they
    default to the cache's). Works under torchrun /
    accelerate launch: slides are sharded across processes.
    """
    from g2l_cache.build import config_from_dict, existing_cache_options, run_build

    values = merge_options(load_toml(config, "build"), slides=[str(s) for s in slides or []],
                           out=str(out) if out else None, teacher=teacher,
                           teacher_weights=str(teacher_weights) if teacher_weights else None,
                           random_init=random_init, mpp=mpp, mpp_override=mpp_override,
                           tile_size=tile_size, crop_size=crop_size, views=views,
                           max_tiles_per_slide=max_tiles_per_slide, tissue_threshold=tissue_threshold,
                           tissue_method=tissue_method, seed=seed, batch_size=batch_size,
                           num_workers=num_workers, tile_format=tile_format, jpeg_quality=jpeg_quality,
                           shards=shards, recursive=recursive, strict=strict, cpu=cpu)
    for required in ("out", "teacher"):
        if not values.get(required):
            raise typer.BadParameter(f"--{required} is required (on the command line or in --config).")
    # Resuming or adding a teacher: options left out take the existing cache's settings.
    values = {**existing_cache_options(values["out"]), **values}
    if no_progress:
        values["progress"] = False
    summary = run_build(config_from_dict(values))
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    if summary.slides_ok == 0 or (values.get("strict") and summary.slides_failed):
        raise typer.Exit(1)


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
            failed.add_row(slide_id, error)
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
