"""Find slides (files, folders, CSV manifests) and open them (OpenSlide, else tiatoolbox) with a known mpp."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from g2l_cache.cpus import usable_cores
from g2l_cache.errors import G2LError

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".jp2", ".png", ".jpg", ".jpeg",
                    ".qptiff", ".scn", ".bif", ".vms", ".vmu")


class SlideError(G2LError):
    """One slide cannot be used; recorded against that slide, the build goes on."""


MPP_RANGE = (0.05, 20.0)  # µm per level-0 pixel: 200x objectives to 0.5x overviews; outside is a wrong tag


@dataclass(frozen=True)
class SlideSpec:
    """A slide to tile: its id, where it is, and an mpp that overrides its metadata if given."""

    slide_id: str
    path: str
    mpp_override: float | None = None

    @classmethod
    def of_record(cls, record: dict) -> "SlideSpec":
        """The spec a planned slide's record was made from."""
        return cls(record["slide_id"], record["path"], record.get("mpp_override"))


@dataclass(frozen=True)
class OpenedSlide:
    """An opened slide with the facts the cache records about it."""

    reader: object  # g2l_cache.wsi reader: OpenSlide's, or tiatoolbox's for what OpenSlide does not read
    mpp: float
    mpp_source: str  # "slide" or "override"
    width: int
    height: int
    reader_name: str


def _is_dicom_folder(folder: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in folder.iterdir() if p.is_file())


def _slides_in_folder(folder: Path, recursive: bool) -> list[Path]:
    if _is_dicom_folder(folder):
        return [folder]
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in SLIDE_EXTENSIONS:
            found.append(entry)
        elif entry.is_dir() and (entry.suffix.lower() == ".zarr" or _is_dicom_folder(entry)):
            found.append(entry)
        elif entry.is_dir() and recursive:
            found.extend(_slides_in_folder(entry, recursive))
    return found


def _slides_from_csv(path: Path, mpp_override: float | None) -> list[SlideSpec]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise G2LError(f"{path}: a slide CSV needs a 'path' column (optional: slide_id, mpp).")
        specs = []
        for line, row in enumerate(reader, start=2):
            slide_path = Path(row["path"])
            if not slide_path.is_absolute():
                slide_path = (path.parent / slide_path).resolve()
            mpp = row.get("mpp") or None
            try:
                mpp_value = float(mpp) if mpp else mpp_override
            except ValueError:
                raise G2LError(f"{path}:{line}: mpp {mpp!r} is not a number.") from None
            slide_id = (row.get("slide_id") or "").strip() or slide_path.stem
            specs.append(SlideSpec(slide_id, str(slide_path), mpp_value))
    return specs


def discover_slides(inputs: list[str | Path], mpp_override: float | None = None,
                    recursive: bool = False) -> list[SlideSpec]:
    """Expand files, folders (searched for slide extensions) and CSVs into unique slide specs."""
    if mpp_override is not None and mpp_override <= 0:
        raise G2LError(f"--mpp-override must be positive, got {mpp_override}.")
    specs: list[SlideSpec] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise G2LError(f"slide input {path} does not exist.")
        if path.is_file() and path.suffix.lower() == ".csv":
            specs.extend(_slides_from_csv(path, mpp_override))
        elif path.is_dir() and path.suffix.lower() != ".zarr" and not _is_dicom_folder(path):
            found = _slides_in_folder(path, recursive)
            if not found:
                raise G2LError(f"no slides found in folder {path} (looked for "
                               f"{', '.join(SLIDE_EXTENSIONS)}{'' if recursive else '; add --recursive for sub-folders'}).")
            specs.extend(SlideSpec(p.stem, str(p.resolve()), mpp_override) for p in found)
        else:
            specs.append(SlideSpec(path.stem, str(path.resolve()), mpp_override))
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.slide_id in seen and seen[spec.slide_id] != spec.path:
            raise G2LError(f"two slides share the id {spec.slide_id!r}: {seen[spec.slide_id]} and "
                           f"{spec.path}; give unique ids with a CSV 'slide_id' column.")
        seen[spec.slide_id] = spec.path
    unique = {s.slide_id: s for s in specs}
    return [unique[k] for k in sorted(unique)]


def open_slide(spec: SlideSpec, cache_bytes: int = 0) -> OpenedSlide:
    """Open a slide (OpenSlide, else tiatoolbox's WSIReader.open); raise SlideError naming the fix if unusable.
    `cache_bytes`: OpenSlide's cache of decoded tiles (for reading many tiles of the slide)."""
    from g2l_cache.wsi import open_reader

    path = Path(spec.path)
    if not path.exists():
        raise SlideError(f"slide file {path} does not exist.")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"slide file {path} is empty.")
    try:
        reader = open_reader(path, spec.mpp_override, cache_bytes)
        width, height = reader.levels[0].width, reader.levels[0].height
    except Exception as exc:  # OpenSlide, tiatoolbox and tifffile raise many types
        raise SlideError(f"cannot read {path.name} as a slide ({type(exc).__name__}: {exc}); "
                         "check the file is a complete, supported WSI.") from None
    if spec.mpp_override:
        mpp, source = float(spec.mpp_override), "override"
    elif reader.mpp is not None and reader.mpp > 0:
        mpp, source = float(reader.mpp), "slide"
    else:
        raise SlideError(f"{path.name} has no mpp (microns per pixel) metadata; pass "
                         "--mpp-override MPP, or an 'mpp' column in a slide CSV.")
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        reader.close()
        told = ("the mpp override given for it" if source == "override" else
                f"its metadata as {reader.name} reads it (a generic TIFF's resolution tags in inches give "
                "such values)")
        raise SlideError(f"{path.name}: {mpp:g} µm per pixel, from {told}, is not a microscope slide's "
                         f"resolution ({MPP_RANGE[0]:g}-{MPP_RANGE[1]:g}); pass --mpp-override MPP, or an 'mpp' "
                         "column in a slide CSV, with the scan's real resolution.")
    return OpenedSlide(reader, mpp, source, int(width), int(height), reader.name)


CONTENT_BLOCK = 1 << 18  # bytes hashed at each end of a slide file: header, first and last directories


def file_fingerprint(path: str | Path) -> dict:
    """Size, mtime and content identity of a slide file (a folder: of its files) as recorded."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"size": None, "mtime": None, "content_id": None}
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        return {"size": sum(f.stat().st_size for f in files),
                "mtime": max((f.stat().st_mtime for f in files), default=st.st_mtime),
                "content_id": content_id(p)}
    return {"size": st.st_size, "mtime": st.st_mtime, "content_id": content_id(p)}


def content_id(path: str | Path) -> str | None:
    """What a slide is, wherever it lies: a hash of its size and its first and last 256 KiB (a folder:
    of its files' names, sizes and first blocks). A copy or a moved file keeps it; mtime and path don't."""
    import hashlib

    p = Path(path)
    h = hashlib.blake2b(digest_size=12)
    try:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(p) if p.is_dir() else ''}|{size}|".encode())
            with f.open("rb") as fh:
                h.update(fh.read(CONTENT_BLOCK))
                if size > 2 * CONTENT_BLOCK and not p.is_dir():
                    fh.seek(size - CONTENT_BLOCK)
                    h.update(fh.read(CONTENT_BLOCK))
    except OSError:
        return None
    return h.hexdigest()


def same_slide_file(recorded: dict | None, path: str | Path) -> bool:
    """Whether the file at `path` is the slide a record describes (by content identity; records made
    before content identities compare size and mtime)."""
    recorded = recorded or {}
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return False
    if not p.is_dir() and recorded.get("size") is not None and st.st_size != recorded["size"]:
        return False
    if recorded.get("content_id"):
        return content_id(p) == recorded["content_id"]
    return recorded.get("size") is not None and file_fingerprint(p)["size"] == recorded["size"] \
        and file_fingerprint(p)["mtime"] == recorded.get("mtime")


def worker_count_hint() -> int:
    """Loader workers per process: this process's cores (its CPU affinity) shared among the processes on it
    (torchrun's LOCAL_WORLD_SIZE), one left for the process itself, at most 8."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, usable_cores() // local - 1))
