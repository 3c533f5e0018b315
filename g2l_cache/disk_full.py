"""A full disk (or quota) while a cache is written: recognised wherever it surfaces, told in one line.

Nothing a build commits points at bytes that were not written (`write_fully`), so a build stopped by
a full disk is resumed by running it again once there is room; the message says where and how much.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from g2l_cache.errors import G2LError
from g2l_cache.units import size

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def write_fully(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset`: `os.pwrite` returns a short count on a disk that fills, without
    raising, so the rest is written by further calls; a call that writes nothing raises ENOSPC."""
    view, offset = memoryview(data), int(offset)
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[written:], offset + written


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is a full disk or an exceeded quota (OSError,
    or LMDB's error carrying the same errno text)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if any(os.strerror(code) in str(exc) for code in FULL_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(folder: str | Path, still_needed: int | None) -> G2LError:
    """The one-line error of a write that found the disk holding `folder` full."""
    folder = Path(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f"; the build still needs about {size(still_needed)} there" if still_needed else ""
    left = f" ({size(free)} free)" if free is not None else ""
    return G2LError(f"the disk holding {folder} is full{left}{need}. Everything committed so far is kept: "
                    "free space (or move the cache folder to a larger disk) and run the same command again "
                    "to resume.")


@contextmanager
def full_disk_explained(folder: str | Path):
    """Turn a full disk met inside the block into `disk_full_error` (other errors pass unchanged)."""
    try:
        yield
    except G2LError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(folder, None) from exc
        raise
