"""What identifies an exported student and the scale it was trained at: its weights' digest and its
cache's mpp. Export writes them; `g2l embed` and the model card read them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from g2l_cache.errors import G2LError


def file_digest(path: Path) -> str:
    """BLAKE2b-80 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.blake2b(digest_size=10)
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def student_fingerprint(export: Path) -> str:
    """What embedding files (and evaluation reports) call an exported student: its weights' digest."""
    return f"student-{file_digest(Path(export) / 'student.safetensors')}"


def cache_mpp(cache: str) -> float | None:
    """The mpp the cache's tiles were read at (what the student was trained on), if readable."""
    from g2l_cache import CacheReader

    try:
        return float(CacheReader(cache).manifest["settings"]["tiling"]["mpp"])
    except G2LError:
        return None
