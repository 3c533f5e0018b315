"""Canary views: digests of the exact inputs the teacher saw, replayed later to prove views still match.

When a slide's first view is embedded, the build stores a digest of that view's input tensor with the
targets. A student fit, `cache verify` and a build that extends the cache replay a sample of these
views with today's libraries; a different digest means the stored tiles now decode, or the views now
come out, differently from what the teacher saw (a Pillow / libjpeg / numpy upgrade), so the cached
targets no longer belong to the inputs the student gets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from g2l_cache.environment import VIEW_LIBRARIES, changed_versions

CANARY_SAMPLE = 64  # canary views a fit or verify replays (of one per slide)
ACCEPT_OPTION = "--accept-changed-views"


def view_digest(view) -> str:
    """Digest of a view tensor's exact bytes (float32, CHW)."""
    return hashlib.blake2b(view.contiguous().numpy().tobytes(), digest_size=16).hexdigest()


@dataclass
class CanaryCheck:
    """The canary views replayed, the slides whose view came out differently, and what that means."""

    checked: int
    changed: list[str] = field(default_factory=list)
    message: str = ""

    @property
    def ok(self) -> bool:
        return not self.changed


ACCEPT_REMEDY = (f"Install the recorded versions, or pass {ACCEPT_OPTION} to go on with the views as they come "
                 "out now")


def changed_views_message(root, changed: list[str], checked: int, recorded_versions: dict | None,
                          remedy: str = ACCEPT_REMEDY) -> str:
    """What a changed replay means, which libraries changed since the cache recorded them, what to do."""
    libraries = changed_versions(recorded_versions, keys=VIEW_LIBRARIES)
    why = (f"the libraries that decode tiles and make views changed ({'; '.join(libraries)})" if libraries
           else "the libraries that decode tiles and make views behave differently here (same versions: "
                "another build of them, or another CPU's code path)")
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return (f"{len(changed)} of {checked} canary views of {root} (slides {shown}) now replay differently from "
            f"the input the teacher saw when they were cached: {why}. Its targets belong to the old inputs. "
            f"{remedy}.")


def canary_views(reader, slide_ids: list[str]) -> np.ndarray:
    """The view row of each slide's canary: the first view of its first tile."""
    slides = reader.slides()["slide_id"].to_list()
    row_of = {s: i for i, s in enumerate(slides)}
    tile_slide = reader.tile_index["slide"]
    first_tiles = np.searchsorted(tile_slide, [row_of[s] for s in slide_ids])
    return np.searchsorted(reader.view_index["tile"], first_tiles)


def check_canaries(reader, n: int = CANARY_SAMPLE, seed: int = 0, remedy: str = ACCEPT_REMEDY) -> CanaryCheck:
    """Replay a seeded sample of up to `n` canary views and compare them with their stored digests."""
    canaries: dict[str, str] = reader.manifest.get("canaries", {})
    if not canaries:
        return CanaryCheck(0)
    ids = sorted(canaries)
    if len(ids) > n:
        ids = sorted(np.random.default_rng([seed, 17]).choice(ids, n, replace=False).tolist())
    rows = canary_views(reader, ids)
    changed = [sid for sid, row in zip(ids, rows) if view_digest(reader.replay(int(row))) != canaries[sid]]
    message = changed_views_message(reader.layout.root, changed, len(ids),
                                    reader.manifest.get("view_versions"), remedy) if changed else ""
    return CanaryCheck(len(ids), changed, message)
