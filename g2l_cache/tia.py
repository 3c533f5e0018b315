"""tiatoolbox, imported without taking over the process's logging.

At import tiatoolbox gives the root logger its own handlers (when it has none), sets it to INFO and
captures Python warnings; its readers then log per-slide metadata notes ("Objective power inferred
from microns-per-pixel") as root WARNINGs, which flood a progress display and a user's script. g2l
records what it needs of each slide itself, so it imports tiatoolbox leaving the root logger's
handlers, level and warning capture as they were, and drops tiatoolbox's own records of WARNING
and below (its errors still show).
"""

from __future__ import annotations

import logging
import warnings

_READY = False


class _DropTiatoolboxChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.WARNING and "tiatoolbox" in record.pathname.replace("\\", "/"))


def import_tiatoolbox() -> None:
    """Import tiatoolbox once, leaving the user's logging set-up as it was (see the module)."""
    global _READY
    if _READY:
        return
    root = logging.getLogger()
    level, capturing = root.level, logging._warnings_showwarning is not None  # noqa: SLF001
    placeholder = None
    if not root.handlers:  # tiatoolbox adds its handlers only to a root logger without any
        placeholder = logging.NullHandler()
        root.addHandler(placeholder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tiatoolbox  # noqa: F401
    finally:
        if placeholder is not None:
            root.removeHandler(placeholder)
        root.setLevel(level)
        if not capturing:
            logging.captureWarnings(False)
        root.addFilter(_DropTiatoolboxChatter())
        _READY = True
