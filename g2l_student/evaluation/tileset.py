"""Labelled tile sets: a folder of class sub-folders, or a CSV with path/label[/split/center/group]."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from g2l_cache.errors import G2LError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
OPTIONAL_COLUMNS = ("split", "center", "group")


@dataclass
class TileSet:
    """Tiles with labels (and optional split/center/group), and a fingerprint of their content."""

    name: str
    table: pl.DataFrame
    fingerprint: str


def load_tileset(data: str | Path) -> TileSet:
    """Read a folder of class sub-folders or a CSV manifest; check columns and files."""
    src = Path(data)
    if not src.exists():
        raise G2LError(f"tile data {src} does not exist.")
    if src.is_dir():
        rows = [{"path": str(p.resolve()), "label": cls.name}
                for cls in sorted(d for d in src.iterdir() if d.is_dir())
                for p in sorted(cls.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not rows:
            raise G2LError(f"{src} has no class sub-folders with images ({', '.join(IMAGE_EXTENSIONS)}).")
        table = pl.DataFrame(rows)
    elif src.suffix.lower() == ".csv":
        table = pl.read_csv(src, infer_schema_length=0)  # every column as text
        missing = [c for c in ("path", "label") if c not in table.columns]
        if missing:
            raise G2LError(f"{src} lacks column(s) {', '.join(missing)}; a tile CSV needs 'path' and "
                           "'label' (optional: split, center, group).")
        table = table.with_columns(pl.col("path").map_elements(
            lambda p: str(p if Path(p).is_absolute() else (src.parent / p).resolve()),
            return_dtype=pl.Utf8))
        keep = ["path", "label", *[c for c in OPTIONAL_COLUMNS if c in table.columns]]
        table = table.select(keep)
    else:
        raise G2LError(f"tile data {src} must be a folder of class sub-folders or a CSV file.")
    if table["label"].null_count():
        raise G2LError(f"{src}: {table['label'].null_count()} tiles have no label.")
    missing_files = [p for p in table["path"].to_list() if not Path(p).is_file()]
    if missing_files:
        raise G2LError(f"{src}: {len(missing_files)} tile files do not exist (e.g. {missing_files[0]}).")
    return TileSet(src.stem, table, _fingerprint(table))


def _fingerprint(table: pl.DataFrame) -> str:
    h = hashlib.blake2b(digest_size=10)
    for row in table.iter_rows():
        h.update("|".join("" if v is None else str(v) for v in row).encode())
        st = Path(row[0]).stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
