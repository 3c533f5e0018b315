"""Numbers as people read them: bytes in B/KB/MB/GB/TB, device time in s/min/h."""

from __future__ import annotations


def size(n: float) -> str:
    """Bytes with a decimal unit, three significant digits."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def hours(seconds: float, unit_prefix: str = "") -> str:
    """Device time as people read it: seconds, minutes or hours (units prefixed, e.g. "GPU-h")."""
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} {unit_prefix}h"
    return f"{seconds / 60:.3g} {unit_prefix}min" if seconds >= 60 else f"{seconds:.3g} {unit_prefix}s"
