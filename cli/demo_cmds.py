"""`g2l demo ...`: demo data made from real H&E pixels."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import console, handle_errors

app = typer.Typer(help="Demo data from the real H&E image that ships with tiatoolbox.",
                  no_args_is_help=True, rich_markup_mode=None)


@app.command("slides")
@handle_errors
def slides(out_dir: Path = typer.Argument(..., help="Folder to write slides into."),
           n_slides: int = typer.Option(4, help="Number of slides."),
           centers: int = typer.Option(2, "--centers", help="Number of centres (stain/scanner styles, 1-4)."),
           seed: int = typer.Option(0, help="Seed for the mosaics.")) -> None:
    """Write pyramidal JPEG TIFF slides with mpp tags, plus one slide without mpp in OUT_DIR/no_mpp/."""
    from g2l_cache.demo_slides import write_demo_slides

    paths = write_demo_slides(out_dir, n_slides=n_slides, n_centres=centers, seed=seed)
    for p in paths:
        console.print(f"wrote {p}")
    console.print(f"wrote {out_dir / 'no_mpp' / 'slide-no-mpp.tif'} (no mpp metadata)")


@app.command("tiles")
@handle_errors
def tiles(out_dir: Path = typer.Argument(..., help="Folder to write the tile set into."),
          n_crops: int = typer.Option(40, help="Source crops (each rendered once per centre)."),
          centers: int = typer.Option(3, "--centers", help="Number of centres (2-4)."),
          tile_px: int = typer.Option(224, help="Tile side in px (0.5 mpp)."),
          seed: int = typer.Option(0, help="Seed for the crops and the split.")) -> None:
    """Write a labelled (nuclei dense/sparse), multi-centre tile set and OUT_DIR/tiles.csv."""
    from g2l_student.evaluation.demo_tiles import write_demo_tiles

    manifest = write_demo_tiles(out_dir, n_crops=n_crops, n_centres=centers, tile_px=tile_px, seed=seed)
    console.print(f"wrote {manifest} ({n_crops * centers} tiles)")
