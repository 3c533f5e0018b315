"""g2l stage one: slides -> tiles -> augmented views -> teacher targets -> cache.

Public API for stage two: `CacheReader` (read a cache), `sample_view` / `apply_view` (replay a view).
"""

from g2l_cache.errors import G2LError
from g2l_cache.views import ViewParams, ViewPolicy, apply_view, sample_view

__all__ = ["G2LError", "ViewParams", "ViewPolicy", "apply_view", "sample_view", "CacheReader"]


def __getattr__(name: str):
    if name == "CacheReader":
        from g2l_cache.reader import CacheReader

        return CacheReader
    raise AttributeError(name)
