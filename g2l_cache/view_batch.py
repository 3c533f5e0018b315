"""The parameters of many views at once, equal to `sample_view` of each, value for value.

`sample_view` makes a numpy Generator per view and draws from it call by call: 80 µs a view, 3 s for
the 38,000 views of one real-size slide, 11 minutes for the real workload's 8 M. Here each view's
stream is seeded as `sample_view` seeds it (the same SeedSequence and PCG64, computed for all views
together by `pcg_batch`), its first raw 64-bit words are taken, and the draws numpy's Generator
would make from them are computed for all views together: two bounded integers (Lemire's method on
the two 32-bit halves of one word), doubles (the top 53 bits of a word), and the permutation
(Fisher-Yates with masked rejection on 32-bit halves). A view whose draws would reject past what is
handled here is drawn by `sample_view` itself, so the result never differs (tests compare both over
many keys).
"""

from __future__ import annotations

import numpy as np

from g2l_cache.pcg_batch import pcg64_raw
from g2l_cache.views import JITTER_OPS, ViewPolicy, sample_view, view_key_digest, view_param_names

RAW_WORDS = 16  # words taken per view: 1 (crop) + 7 doubles + up to 4 for the permutation + 2 doubles
_LOW32 = np.uint64(0xFFFFFFFF)


def sample_view_columns(seed: int, keys: list[tuple[str, int]], policy: ViewPolicy) -> dict[str, list]:
    """The view parameter columns (`view_param_names()` order) of views `keys` = [(tile_id, k), ...]."""
    n = len(keys)
    span = policy.tile_size - policy.crop_size
    if span < 0 or span + 1 > 1 << 31 or len(JITTER_OPS) != 4:  # drawn differently: the reference serves
        return _reference_columns(seed, keys, policy)
    digests = b"".join([view_key_digest(seed, tile_id, k) for tile_id, k in keys])
    raw = pcg64_raw(np.frombuffer(digests, dtype="<u4").reshape(n, 4), RAW_WORDS)
    doubles = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    lo, hi = raw & _LOW32, raw >> np.uint64(32)

    # integers(0, span + 1, size=2): Lemire's method on the low then high half of word 0 (no word at
    # all when the crop is the whole tile: numpy returns the only value without drawing)
    span_excl = np.uint64(span + 1)
    m_x, m_y = lo[:, 0] * span_excl, hi[:, 0] * span_excl
    unsure = ((m_x & _LOW32) < span_excl) | ((m_y & _LOW32) < span_excl)  # a rejection is possible
    crop_x, crop_y = (m_x >> np.uint64(32)).astype(np.int64), (m_y >> np.uint64(32)).astype(np.int64)
    if span == 0:
        # word w of the layout below is raw word w - 1
        doubles, lo, hi = (np.concatenate([a[:, :1], a[:, :-1]], axis=1) for a in (doubles, lo, hi))
        unsure[:] = False
        crop_x = crop_y = np.zeros(n, dtype=np.int64)

    # permutation(4): swaps for i = 3, 2, 1, each a masked draw from the next 32-bit half (words 8 on)
    halves = np.stack([lo[:, 8:12], hi[:, 8:12]], axis=2).reshape(n, 8)
    order = np.tile(np.arange(4), (n, 1))
    rows = np.arange(n)
    at = np.zeros(n, dtype=np.int64)
    for i, mask in ((3, 3), (2, 3), (1, 1)):
        for _ in range(3):  # up to two rejections each; more goes to the reference
            value = (halves[rows, np.minimum(at, 7)] & np.uint64(mask)).astype(np.int64)
            rejected = value > i
            if not rejected.any():
                break
            at += rejected
        unsure |= (value > i) | (at > 7)
        j = np.minimum(value, i)
        order[rows, i], order[rows, j] = order[rows, j], order[rows, i].copy()
        at += 1
    after = 8 + (at + 1) // 2  # the first word after those the permutation touched
    unsure |= after + 2 > RAW_WORDS
    after = np.minimum(after, RAW_WORDS - 2)

    def uniform(column: np.ndarray, low: float, high: float) -> np.ndarray:
        return low + (high - low) * column

    letters = np.array(list(JITTER_OPS))
    cols = {
        "crop_x": crop_x.tolist(), "crop_y": crop_y.tolist(), "crop_size": [policy.crop_size] * n,
        "hflip": (doubles[:, 1] < policy.hflip_p).tolist(), "vflip": (doubles[:, 2] < policy.vflip_p).tolist(),
        "jitter_applied": (doubles[:, 3] < policy.jitter_p).tolist(),
        "brightness": uniform(doubles[:, 4], 1 - policy.brightness, 1 + policy.brightness).tolist(),
        "contrast": uniform(doubles[:, 5], 1 - policy.contrast, 1 + policy.contrast).tolist(),
        "saturation": uniform(doubles[:, 6], 1 - policy.saturation, 1 + policy.saturation).tolist(),
        "hue": uniform(doubles[:, 7], -policy.hue, policy.hue).tolist(),
        "jitter_order": ["".join(row) for row in letters[order].tolist()],
        "blur_applied": (doubles[rows, after] < policy.blur_p).tolist(),
        "blur_sigma": uniform(doubles[rows, after + 1], policy.blur_sigma_min, policy.blur_sigma_max).tolist(),
        "blur_kernel": [policy.blur_kernel] * n,
    }
    for i in np.flatnonzero(unsure).tolist():
        params = sample_view(seed, keys[i][0], keys[i][1], policy)
        for name in cols:
            cols[name][i] = getattr(params, name)
    return {name: cols[name] for name in view_param_names()}


def _reference_columns(seed: int, keys: list[tuple[str, int]], policy: ViewPolicy) -> dict[str, list]:
    drawn = [sample_view(seed, tile_id, k, policy) for tile_id, k in keys]
    return {name: [getattr(p, name) for p in drawn] for name in view_param_names()}
