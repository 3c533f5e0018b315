"""`g2l embed`: one embedding per tile for a teacher preset, a student run/export, or a timm model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from g2l_cache.errors import G2LError
from g2l_cache.teachers import DEFAULT_PRECISION
from g2l_student.evaluation.tileset import TileSet, load_tileset
from g2l_student.provenance import cache_mpp, student_fingerprint

META_KEY = b"g2l_embeddings"


@dataclass
class EmbeddingModel:
    """Something that maps [0, 1] tiles of `input_size` px at `mpp` to one vector each."""

    name: str
    fingerprint: str
    input_size: int
    mpp: float
    embed: Callable[[torch.Tensor], torch.Tensor]


def _student_export(model: Path) -> Path | None:
    """The export folder behind a run folder, an export folder, or its student.safetensors."""
    if model.is_file() and model.suffix == ".safetensors":
        folder = model.parent
    elif (model / "run.json").exists():
        folder = model / "export"
        if not (folder / "student.safetensors").exists():  # embed writes only its --out file
            raise G2LError(f"run {model} has no export yet; write it with `g2l student export {model}` "
                           "(it goes into the run folder), then embed again.")
    elif (model / "student.safetensors").exists():
        folder = model
    else:
        return None
    if not (folder / "config.json").exists():
        raise G2LError(f"{folder} has no config.json next to the student weights; re-export the run "
                       "with `g2l student export RUN`.")
    return folder


def load_embedding_model(model: str, random_init: bool = False, weights: str | None = None,
                         img_size: int | None = None, device: str = "cpu", seed: int = 0,
                         precision: str = DEFAULT_PRECISION) -> EmbeddingModel:
    """Resolve MODEL: a student run/export (loaded with plain timm), a teacher preset or a timm name."""
    import timm

    from g2l_cache.teachers import TeacherSpec, load_teacher, split_embedding

    path = Path(model)
    export = _student_export(path) if path.exists() else None
    if export is not None:
        cfg = json.loads((export / "config.json").read_text())
        size = img_size or cfg["model_args"]["img_size"]
        weights_file = export / "student.safetensors"
        args = {**cfg["model_args"], "img_size": size}
        net = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0, **args,
                                pretrained_cfg_overlay=dict(file=str(weights_file), custom_load=False))
        net = net.eval().to(device)
        mean = torch.tensor(cfg["pretrained_cfg"]["mean"], device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg["pretrained_cfg"]["std"], device=device).view(1, 3, 1, 1)
        mpp = _student_mpp(cfg, export)

        @torch.inference_mode()
        def embed(x: torch.Tensor) -> torch.Tensor:
            feats = net.forward_features((x.to(device) - mean) / std)
            return split_embedding(net, feats, "cls")[0]

        fp = f"{student_fingerprint(export)}-{size}"
        return EmbeddingModel(str(export.parent.name if export.name == "export" else export.name),
                              fp, size, mpp, embed)
    if path.exists() and path.is_dir():
        raise G2LError(f"{path} is neither a student run nor an export folder.")
    teacher = load_teacher(TeacherSpec(model, weights, random_init, seed, precision), img_size=img_size, device=device)
    return EmbeddingModel(model, f"{teacher.fingerprint()}-{teacher.img_size}", teacher.img_size, 0.5,
                          lambda x: teacher.embed(x)[0])


def _student_mpp(cfg: dict, export: Path) -> float:
    """The mpp the student was trained at: recorded in its export, else read from its cache."""
    g2l = cfg.get("g2l", {})
    mpp = g2l.get("mpp") or (cache_mpp(g2l["cache"]) if g2l.get("cache") else None)
    if mpp is None:
        raise G2LError(f"{export / 'config.json'} records no mpp and its cache {g2l.get('cache')!r} cannot be "
                       "read; re-export the run with `g2l student export RUN` while its cache is in place "
                       "(the export then records the mpp).")
    return float(mpp)


class _Tiles(Dataset):
    """Tile i resized to the model's input at its mpp: [0, 1] float CHW."""

    def __init__(self, paths: list[str], size: int, scale: float):
        self.paths, self.size, self.scale = paths, size, scale

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        if self.scale != 1.0:  # bring the tile to the model's mpp first
            img = img.resize((max(1, round(img.width * self.scale)), max(1, round(img.height * self.scale))),
                             Image.Resampling.BICUBIC)
        if img.width > self.size and img.height > self.size:
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def embed_tileset(model: EmbeddingModel, tiles: TileSet, out: Path, data_mpp: float | None = None,
                  batch_size: int = 32, num_workers: int = 0, progress: bool = True) -> bool:
    """Write OUT parquet (path, label, [split, center, group], embedding); False if already cached."""
    out = Path(out)
    key = {"model": model.name, "model_fingerprint": model.fingerprint, "data": tiles.name,
           "data_fingerprint": tiles.fingerprint, "data_mpp": data_mpp, "model_mpp": model.mpp}
    if out.exists():
        meta = read_embedding_meta(out)
        if meta is not None and all(meta.get(k) == v for k, v in key.items()):
            return False
    scale = (data_mpp / model.mpp) if data_mpp else 1.0
    loader = DataLoader(_Tiles(tiles.table["path"].to_list(), model.input_size, scale),
                        batch_size=batch_size, num_workers=num_workers)
    chunks = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"embedding with {model.name}", total=len(loader.dataset))
        for x in loader:
            chunks.append(model.embed(x).float().cpu().numpy())
            bar.advance(task, len(x))
    emb = np.concatenate(chunks).astype(np.float32)
    if not np.isfinite(emb).all():
        raise G2LError(f"{model.name} produced NaN/inf embeddings for {int((~np.isfinite(emb)).any(1).sum())} tiles.")
    write_embeddings(out, tiles.table, emb, key)
    return True


def write_embeddings(out: Path, table: pl.DataFrame, vectors: np.ndarray, key: dict) -> None:
    """An embedding file: the tile table plus a fixed-size `embedding` column, with `key` (model,
    data and their fingerprints) as metadata; written to a temporary name, then renamed."""
    arrow = table.to_arrow().append_column(
        "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]))
    arrow = arrow.replace_schema_metadata({META_KEY: json.dumps({**key, "dim": int(vectors.shape[1])}).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.parquet")
    # row groups of 16k tiles: a reader decodes one at a time, not the whole file at once
    pq.write_table(arrow, tmp, row_group_size=16384)
    tmp.replace(out)


def read_embedding_meta(path: Path) -> dict | None:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else None


@dataclass
class Embeddings:
    """One embedding file: its table (without the vectors), the vectors, and where they came from."""

    path: Path
    model: str
    data: str
    data_fingerprint: str
    table: pl.DataFrame
    vectors: np.ndarray
    model_fingerprint: str = ""


def _open_embedding_file(path: str | Path):
    """(path, metadata, ParquetFile) of a file written by `g2l embed`; clear errors for anything else."""
    p = Path(path)
    if not p.is_file():
        raise G2LError(f"embedding file {p} does not exist.")
    import pyarrow.parquet as pq

    try:
        meta = read_embedding_meta(p)
        parquet = pq.ParquetFile(p, pre_buffer=False)
    except Exception as exc:
        raise G2LError(f"{p} is not a readable Parquet file ({exc}).") from None
    if meta is None or "embedding" not in parquet.schema_arrow.names:
        raise G2LError(f"{p} was not written by `g2l embed` (no embedding column / metadata).")
    return p, meta, parquet


def embedding_tile_set(path: str | Path) -> tuple[str, str]:
    """(data name, data fingerprint) of an embedding file, read from its metadata only."""
    _, meta, _ = _open_embedding_file(path)
    return meta["data"], meta["data_fingerprint"]


def read_embeddings(path: str | Path) -> Embeddings:
    """Load a file written by `g2l embed`, with clear errors for anything else."""
    p, meta, parquet = _open_embedding_file(path)
    names = parquet.schema_arrow.names
    table = pl.read_parquet(p, columns=[c for c in names if c != "embedding"])
    for col in ("path", "label"):
        if col not in table.columns:
            raise G2LError(f"{p} lacks the '{col}' column.")
    # batch by batch into one float32 array: no per-tile Python objects, and never the file's
    # Arrow buffers and the array in memory at once
    dim = parquet.schema_arrow.field("embedding").type.list_size
    vectors = np.empty((parquet.metadata.num_rows, dim), dtype=np.float32)
    row, finite = 0, True
    for group in range(parquet.metadata.num_row_groups):  # one decoded row group at a time
        for chunk in parquet.read_row_group(group, columns=["embedding"]).column(0).chunks:
            block = vectors[row:row + len(chunk)]
            block[:] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), dim)
            finite = finite and bool(np.isfinite(block).all())  # per chunk: no n x dim mask
            row += len(chunk)
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps decoded pages otherwise
    if not finite:
        raise G2LError(f"{p} holds NaN or infinite embeddings; re-embed the tiles.")
    return Embeddings(p, meta["model"], meta["data"], meta["data_fingerprint"], table, vectors,
                      meta.get("model_fingerprint", ""))


__all__ = ["EmbeddingModel", "load_embedding_model", "embed_tileset", "read_embeddings", "load_tileset"]
