"""Shared fixtures: small demo slides and small caches built with a tiny random-weight teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from g2l_cache.build import run_build
from g2l_cache.demo_slides import write_demo_slides
from helpers import small_config


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slides")
    write_demo_slides(out, n_slides=3, n_centres=3, seed=1, size_um=(800.0, 600.0))
    return out


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, demo_dir) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    run_build(small_config(out, [demo_dir]))
    return out
