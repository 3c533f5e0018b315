"""g2l stage one: slides -> tiles -> augmented views -> teacher targets -> cache.

Public API for stage two: `CacheReader` (read a cache), `sample_view` / `apply_view` (replay a view).
"""

import logging as _logging

# tiatoolbox installs INFO/WARNING handlers on the root logger at import when it has none, which
# floods a progress display with per-slide metadata notes. A NullHandler keeps that from happening.
if not _logging.getLogger().hasHandlers():
    _logging.getLogger().addHandler(_logging.NullHandler())

from g2l_cache.errors import G2LError  # noqa: E402
from g2l_cache.views import ViewParams, ViewPolicy, apply_view, sample_view  # noqa: E402

__all__ = ["G2LError", "ViewParams", "ViewPolicy", "apply_view", "sample_view", "CacheReader"]


def __getattr__(name: str):
    if name == "CacheReader":
        from g2l_cache.reader import CacheReader

        return CacheReader
    raise AttributeError(name)
