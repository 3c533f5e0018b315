"""The library versions that decide a view and a target, recorded with a cache that outlives them.

A view is the stored tile bytes decoded (Pillow and its JPEG library) and augmented (numpy); a target
is the teacher (torch, timm) run on that view. A cache kept for months is read after `pip upgrade`s:
the manifest records these versions so a changed replay can say what changed.
"""

from __future__ import annotations

import platform
from importlib import metadata

VIEW_LIBRARIES = ("numpy", "pillow", "libjpeg")  # decode the stored tile and make the view
TARGET_LIBRARIES = ("torch", "timm")  # run the teacher on it


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Versions of everything that decides a view or a target in this environment."""
    from PIL import features

    jpeg = features.version("jpg")
    turbo = features.check_feature("libjpeg_turbo")
    return {"python": platform.python_version(), "g2l": _version("g2l"), "numpy": _version("numpy"),
            "pillow": _version("pillow"),
            "libjpeg": f"{'libjpeg-turbo' if turbo else 'libjpeg'} {jpeg}" if jpeg else None,
            "torch": _version("torch"), "timm": _version("timm")}


def changed_versions(recorded: dict | None, current: dict | None = None,
                     keys: tuple[str, ...] = VIEW_LIBRARIES + TARGET_LIBRARIES) -> list[str]:
    """'pillow 11.0.0 -> 12.1.1' for each library in `keys` whose version differs."""
    recorded, current = recorded or {}, current or library_versions()
    return [f"{k} {recorded.get(k) or 'not recorded'} -> {current.get(k)}" for k in keys
            if recorded.get(k) != current.get(k)]
