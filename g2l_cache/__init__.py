"""g2l stage one: slides -> tiles -> augmented views -> teacher targets -> cache.

Public API for stage two: `CacheReader` (read a cache), `sample_view` / `apply_view` (replay a view).
Names load on first use, so `import g2l_cache.X` costs only X's imports (planning needs no torch).
"""

from g2l_cache.errors import G2LError

__all__ = ["G2LError", "ViewParams", "ViewPolicy", "apply_view", "sample_view", "CacheReader"]


def __getattr__(name: str):
    if name == "CacheReader":
        from g2l_cache.reader import CacheReader

        return CacheReader
    if name in ("ViewParams", "ViewPolicy", "apply_view", "sample_view"):
        from g2l_cache import views

        return getattr(views, name)
    raise AttributeError(name)
