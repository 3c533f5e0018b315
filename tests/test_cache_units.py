"""Small pieces of the cache store: target rows, bitmaps, the view index, worker defaults."""

import numpy as np
import pytest

from g2l_cache import G2LError
from g2l_cache.slides import worker_count_hint
from g2l_cache.store import (CorruptValue, bits_from_bytes, bits_to_bytes, decode_target, encode_targets,
                             target_row_bytes)
from g2l_cache.tables import VIEW_INDEX_DTYPE, params_from_index, slide_tables, view_index_rows
from g2l_cache.tiling import TileRecord
from g2l_cache.views import ViewPolicy, apply_view, sample_view


def test_target_rows_round_trip_with_their_checksum():
    rng = np.random.default_rng(0)
    emb, patch = rng.standard_normal((3, 5)), rng.standard_normal((3, 7))
    rows = encode_targets(emb, patch)
    assert rows.shape == (3, target_row_bytes(5, 7)) == (3, 2 * 12 + 4)
    e, p = decode_target(rows[1].tobytes(), 5)
    np.testing.assert_array_equal(e, emb[1].astype(np.float16))
    np.testing.assert_array_equal(p, patch[1].astype(np.float16))
    damaged = bytearray(rows[1].tobytes())
    damaged[2] ^= 1
    with pytest.raises(CorruptValue, match="checksum"):
        decode_target(bytes(damaged), 5)


def test_bitmaps_keep_exactly_the_views_set():
    bits = np.zeros(13, dtype=bool)
    bits[[0, 5, 12]] = True
    data = bits_to_bytes(bits)
    assert len(data) == 2 and np.array_equal(bits_from_bytes(data, 13), bits)
    assert not bits_from_bytes(None, 4).any()


def test_the_view_index_replays_the_same_pixels_as_the_drawn_params():
    policy = ViewPolicy(tile_size=64, crop_size=48, jitter_p=0.9, blur_p=0.5)
    tiles = [TileRecord(f"s@{i}_0", i, 0, 64, 1.0) for i in range(5)]
    tile_table, views = slide_tables("s", tiles, 0.5, 64, 3, seed=7, policy=policy)
    index = view_index_rows(views, first_tile=10, k_views=3, row_start=100)
    assert index.dtype == VIEW_INDEX_DTYPE and VIEW_INDEX_DTYPE.itemsize == 39
    assert index["tile"].tolist() == [10 + v // 3 for v in range(15)]
    assert index["row"].tolist() == list(range(100, 115)) and index["k"].tolist() == [0, 1, 2] * 5
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for v in range(15):
        drawn = sample_view(7, tiles[v // 3].tile_id, v % 3, policy)
        replayed = params_from_index(index[v], policy)
        assert (replayed.crop_x, replayed.jitter_order, replayed.blur_sigma, replayed.hflip) == \
            (drawn.crop_x, drawn.jitter_order, drawn.blur_sigma, drawn.hflip)
        # float32 jitter factors give the very same view: apply_view casts them to float32 anyway
        assert np.array_equal(apply_view(pixels, replayed).numpy(), apply_view(pixels, drawn).numpy())
    assert tile_table.num_rows == 5 and views.num_rows == 15


def test_workers_default_to_the_cores_shared_by_the_local_processes(monkeypatch):
    # the cores this process may use (its affinity: what Slurm and cgroups give it)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert worker_count_hint() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert worker_count_hint() == 7
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert worker_count_hint() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert worker_count_hint() == 1


def test_non_finite_rows_name_the_count():
    with pytest.raises(G2LError, match="2 of 3 views"):
        encode_targets(np.array([[np.inf], [0.0], [np.nan]]), np.zeros((3, 1)))
