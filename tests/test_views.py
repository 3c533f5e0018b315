"""Views are data: keyed, pure sampling and bit-identical application."""


import numpy as np
import pytest
import torch

from g2l_cache import G2LError
from g2l_cache.views import ViewParams, ViewPolicy, apply_view, gaussian_blur, sample_view


def _pixels(seed=0, size=256):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_sample_view_is_pure_and_keyed():
    policy = ViewPolicy()
    a = sample_view(7, "slide@0_0", 3, policy)
    # Drawing other views first must not change this one: the stream is keyed, not sequential.
    for k in range(10):
        sample_view(7, "slide@0_0", k, policy)
    assert sample_view(7, "slide@0_0", 3, policy) == a
    assert sample_view(8, "slide@0_0", 3, policy) != a
    assert sample_view(7, "slide@0_1", 3, policy) != a
    assert sample_view(7, "slide@0_0", 2, policy) != a


def test_sampled_params_follow_the_g2l_policy():
    policy = ViewPolicy()
    params = [sample_view(0, f"t{i}", k, policy) for i in range(300) for k in range(4)]
    assert all(0 <= p.crop_x <= 32 and 0 <= p.crop_y <= 32 and p.crop_size == 224 for p in params)
    assert all(0.85 <= p.brightness <= 1.15 and 0.85 <= p.contrast <= 1.15 for p in params)
    assert all(0.9 <= p.saturation <= 1.1 and -0.05 <= p.hue <= 0.05 for p in params)
    assert all(sorted(p.jitter_order) == list("bchs") and p.blur_kernel == 9 for p in params)
    rate = lambda f: np.mean([f(p) for p in params])  # noqa: E731
    assert 0.4 < rate(lambda p: p.hflip) < 0.6 and 0.4 < rate(lambda p: p.vflip) < 0.6
    assert 0.4 < rate(lambda p: p.jitter_applied) < 0.6
    assert 0.05 < rate(lambda p: p.blur_applied) < 0.16


def _all_on(k):
    p = sample_view(1, "tile", k, ViewPolicy())
    return ViewParams(**{**p.to_dict(), "jitter_applied": True, "blur_applied": True,
                         "hflip": True, "vflip": True})


def test_apply_view_geometry_and_range():
    px = _pixels()
    base = ViewParams(5, 9, 224, False, False, False, 1, 1, 1, 0, "bcsh", False, 1.0, 9)
    out = apply_view(px, base)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = torch.from_numpy(px[9:233, 5:229].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(out, expected)
    flipped = apply_view(px, ViewParams(**{**base.to_dict(), "hflip": True}))
    assert torch.equal(flipped, expected.flip(-1))
    jittered = apply_view(px, _all_on(0))
    assert 0 <= float(jittered.min()) and float(jittered.max()) <= 1


def test_colour_ops_match_torchvision_semantics():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    px = _pixels(3)
    x = torch.from_numpy(px[:224, :224].astype(np.float32) / 255).permute(2, 0, 1)
    cases = {"b": (tvf.adjust_brightness, 1.1), "c": (tvf.adjust_contrast, 0.9),
             "s": (tvf.adjust_saturation, 1.08), "h": (tvf.adjust_hue, 0.04)}
    for op, (fn, value) in cases.items():
        p = ViewParams(0, 0, 224, False, False, True, 1.1, 0.9, 1.08, 0.04, op, False, 1.0, 9)
        assert float((apply_view(px, p) - fn(x, value)).abs().max()) < 1e-4, op


def test_blur_is_normalised_and_smooths():
    img = np.zeros((21, 21, 3), np.float32)
    img[10, 10] = 1
    out = gaussian_blur(img, 1.5, 9)
    assert abs(float(out.sum()) - 3.0) < 1e-5 and out[10, 10, 0] < 0.2


def test_bad_pixels_and_policy_are_clear_errors():
    with pytest.raises(G2LError, match="uint8"):
        apply_view(np.zeros((256, 256, 3), np.float32), sample_view(0, "t", 0, ViewPolicy()))
    with pytest.raises(G2LError, match="does not fit"):
        apply_view(_pixels(size=100), sample_view(0, "t", 0, ViewPolicy()))
    with pytest.raises(G2LError, match="crop size"):
        ViewPolicy(tile_size=64, crop_size=96)
