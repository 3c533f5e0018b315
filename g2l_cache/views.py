"""Augmented views as data: a pure, keyed sampler and a pure, deterministic applier.

`sample_view(seed, tile_id, view_index, policy)` draws every parameter of one view from a random
stream keyed by its arguments alone, so any view can be regenerated on its own, in any process.
`apply_view(pixels, params)` turns decoded tile pixels into the float tensor a model sees; it uses
only element-wise numpy arithmetic in a fixed order, so it is bit-identical on every re-run, thread
count and process. Stage one (teacher) and stage two (student) both call these two functions.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import numpy as np

from g2l_cache.errors import G2LError

JITTER_OPS = "bcsh"  # brightness, contrast, saturation, hue


@dataclass(frozen=True)
class ViewPolicy:
    """The G2L augmentation policy; defaults are the paper's."""

    tile_size: int = 256
    crop_size: int = 224
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    jitter_p: float = 0.5
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.1
    hue: float = 0.05
    blur_p: float = 0.1
    blur_kernel: int = 9
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.crop_size <= self.tile_size:
            raise G2LError(f"crop size {self.crop_size} must be in 1..tile size {self.tile_size}.")
        if self.blur_kernel % 2 != 1:
            raise G2LError(f"blur kernel must be odd, got {self.blur_kernel}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ViewParams:
    """Every parameter drawn for one view, applied or not; one Parquet column each."""

    crop_x: int
    crop_y: int
    crop_size: int
    hflip: bool
    vflip: bool
    jitter_applied: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_order: str
    blur_applied: bool
    blur_sigma: float
    blur_kernel: int

    def to_dict(self) -> dict:
        # every field is a plain value: no deep copy needed (asdict's costs 12 us a view)
        return {name: getattr(self, name) for name in _VIEW_FIELDS}

    @classmethod
    def from_dict(cls, row: dict) -> "ViewParams":
        """Rebuild from a Parquet row (extra columns are ignored)."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})


_VIEW_FIELDS = tuple(f.name for f in fields(ViewParams))


def view_param_names() -> list[str]:
    """Column names of the view parameters, in storage order."""
    return list(_VIEW_FIELDS)


def _view_rng(seed: int, tile_id: str, view_index: int) -> np.random.Generator:
    return np.random.Generator(view_bit_generator(seed, tile_id, view_index))


def view_key_digest(seed: int, tile_id: str, view_index: int) -> bytes:
    """The 16-byte digest one view's stream is seeded from (four little-endian 32-bit words)."""
    return hashlib.blake2b(f"{seed}|{tile_id}|{view_index}".encode(), digest_size=16).digest()


def view_bit_generator(seed: int, tile_id: str, view_index: int) -> np.random.PCG64:
    """The bit generator of one view's stream (what `sample_view` draws from)."""
    # Hashing the key (not Python's hash(), which is salted per process) gives every view its own
    # stream, independent of which other views exist or in what order they are drawn. The digest's
    # 32-bit words (high zero words dropped) are the entropy SeedSequence makes of the 128-bit integer
    # they spell: the same stream, seeded without converting a Python int.
    words = np.frombuffer(view_key_digest(seed, tile_id, view_index), dtype="<u4")
    n = len(words)
    while n > 1 and words[n - 1] == 0:
        n -= 1
    return np.random.PCG64(np.random.SeedSequence(words[:n]))


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    # what Generator.uniform computes (low + (high - low) * next double), without its call overhead
    return low + (high - low) * rng.random()


def sample_view(seed: int, tile_id: str, view_index: int, policy: ViewPolicy) -> ViewParams:
    """Draw the parameters of view `view_index` of `tile_id`; pure: same key, same params."""
    rng = _view_rng(seed, tile_id, view_index)
    # Always draw every value in the same order so the stream layout never depends on outcomes.
    span = policy.tile_size - policy.crop_size
    crop_x, crop_y = (int(v) for v in rng.integers(0, span + 1, size=2))
    hflip = bool(rng.random() < policy.hflip_p)
    vflip = bool(rng.random() < policy.vflip_p)
    jitter_applied = bool(rng.random() < policy.jitter_p)
    brightness = _uniform(rng, 1 - policy.brightness, 1 + policy.brightness)
    contrast = _uniform(rng, 1 - policy.contrast, 1 + policy.contrast)
    saturation = _uniform(rng, 1 - policy.saturation, 1 + policy.saturation)
    hue = _uniform(rng, -policy.hue, policy.hue)
    order = "".join([JITTER_OPS[i] for i in rng.permutation(len(JITTER_OPS))])
    blur_applied = bool(rng.random() < policy.blur_p)
    blur_sigma = _uniform(rng, policy.blur_sigma_min, policy.blur_sigma_max)
    return ViewParams(crop_x, crop_y, policy.crop_size, hflip, vflip, jitter_applied, brightness,
                      contrast, saturation, hue, order, blur_applied, blur_sigma, policy.blur_kernel)


def apply_view(pixels: np.ndarray, params: ViewParams) -> "torch.Tensor":  # noqa: F821
    """Make the model input of one view: float32 CHW in [0, 1] from HWC uint8 RGB tile pixels."""
    import torch  # here, not at the top: planning imports this module and needs no torch

    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise G2LError(f"tile pixels must be HxWx3 uint8, got {pixels.shape} {pixels.dtype}.")
    s = params.crop_size
    if params.crop_y + s > pixels.shape[0] or params.crop_x + s > pixels.shape[1]:
        raise G2LError(f"view crop {s}px at ({params.crop_x}, {params.crop_y}) does not fit a "
                       f"{pixels.shape[1]}x{pixels.shape[0]} tile.")
    img = pixels[params.crop_y:params.crop_y + s, params.crop_x:params.crop_x + s]
    if params.hflip:
        img = img[:, ::-1]
    if params.vflip:
        img = img[::-1, :]
    img = np.ascontiguousarray(img, dtype=np.float32) / np.float32(255.0)
    if params.jitter_applied:
        for op in params.jitter_order:
            img = _JITTER[op](img, params)
    if params.blur_applied:
        img = gaussian_blur(img, params.blur_sigma, params.blur_kernel)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _grayscale(img: np.ndarray) -> np.ndarray:
    return (np.float32(0.299) * img[..., 0] + np.float32(0.587) * img[..., 1]
            + np.float32(0.114) * img[..., 2])


def _blend(img: np.ndarray, other: np.ndarray | np.float32, factor: float) -> np.ndarray:
    f = np.float32(factor)
    return np.clip(f * img + (np.float32(1) - f) * other, 0, 1).astype(np.float32)


def _brightness(img: np.ndarray, p: ViewParams) -> np.ndarray:
    return _blend(img, np.float32(0), p.brightness)


def _contrast(img: np.ndarray, p: ViewParams) -> np.ndarray:
    # float64 accumulation of the mean: its result does not depend on summation blocking.
    mean = np.float32(_grayscale(img).astype(np.float64).mean())
    return _blend(img, mean, p.contrast)


def _saturation(img: np.ndarray, p: ViewParams) -> np.ndarray:
    return _blend(img, _grayscale(img)[..., None], p.saturation)


def _hue(img: np.ndarray, p: ViewParams) -> np.ndarray:
    h, s, v = _rgb_to_hsv(img)
    h = np.mod(h + np.float32(p.hue), np.float32(1.0)).astype(np.float32)
    return _hsv_to_rgb(h, s, v)


_JITTER = {"b": _brightness, "c": _contrast, "s": _saturation, "h": _hue}


def _rgb_to_hsv(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    delta = maxc - minc
    safe_delta = np.where(delta == 0, np.float32(1), delta)
    s = np.where(maxc == 0, np.float32(0), delta / np.where(maxc == 0, np.float32(1), maxc))
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    h = np.where(maxc == r, bc - gc, np.where(maxc == g, np.float32(2) + rc - bc,
                                               np.float32(4) + gc - rc))
    h = np.where(delta == 0, np.float32(0), np.mod(h / np.float32(6), np.float32(1)))
    return h.astype(np.float32), s.astype(np.float32), maxc.astype(np.float32)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * np.float32(6))
    f = h * np.float32(6) - i
    i = i.astype(np.int32) % 6
    p = v * (np.float32(1) - s)
    q = v * (np.float32(1) - s * f)
    t = v * (np.float32(1) - s * (np.float32(1) - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.clip(np.stack([r, g, b], axis=-1), 0, 1).astype(np.float32)


def gaussian_blur(img: np.ndarray, sigma: float, kernel: int) -> np.ndarray:
    """Separable Gaussian blur with reflect padding, as explicit shifted sums in a fixed order."""
    half = kernel // 2
    x = np.arange(-half, half + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    weights = (weights / weights.sum()).astype(np.float32)
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (half, half)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k in range(kernel):
            sl = [slice(None)] * 3
            sl[axis] = slice(k, k + n)
            acc += weights[k] * padded[tuple(sl)]
        out = acc
    return out.astype(np.float32)
