"""A build never discards committed work unasked: options left out (the mpp override included) take
what the cache recorded, a slide whose settings changed is refused with the slide and the change
named unless --replan-changed asks for it, and a slide whose file is gone keeps its tiles and targets."""

import shutil

import pytest

from helpers import cache_content, committed_targets, copy_slides, small_config
from g2l_cache import G2LError
from g2l_cache.build import run_build
from g2l_cache.reader import CacheReader


def test_a_build_keeps_committed_targets_unless_a_replan_is_asked_for(demo_dir, tmp_path):
    slides = copy_slides(demo_dir, tmp_path / "slides")
    cache = tmp_path / "cache"
    first = run_build(small_config(cache, [slides], mpp_override=0.45))
    content, targets = cache_content(cache), committed_targets(cache)

    # the same folder without --mpp-override: the override each slide was cached with stands
    again = run_build(small_config(cache, [slides]))
    assert again.targets_written == 0 and again.slides_failed == 0
    assert cache_content(cache) == content and committed_targets(cache) == targets

    # another override: refused, naming every slide and the change; nothing is touched
    with pytest.raises(G2LError, match="--replan-changed") as refused:
        run_build(small_config(cache, [slides], mpp_override=0.4))
    message = str(refused.value)
    assert message.startswith(f"{first.slides_ok} cached slide(s) would be tiled again")
    for slide in sorted(slides.glob("*.tif")):
        assert f"{slide.stem} (mpp 0.45 -> override 0.4)" in message
    assert cache_content(cache) == content

    # the folder moved and one of its slides is gone: a CSV of the new paths keeps all three
    moved = tmp_path / "moved"
    shutil.copytree(slides, moved)
    gone = sorted(moved.glob("*.tif"))[0]
    gone.unlink()
    csv = tmp_path / "slides.csv"
    csv.write_text("path,slide_id\n" + "".join(f"{moved / p.name},{p.stem}\n" for p in sorted(slides.glob("*.tif"))))
    kept = run_build(small_config(cache, [csv]))
    assert kept.slides_failed == 0 and kept.targets_written == 0
    data = {k: v for k, v in content.items() if k != "slides"}
    assert {k: v for k, v in cache_content(cache).items() if k != "slides"} == data
    recorded = CacheReader(str(cache)).slides()
    assert set(recorded["status"].to_list()) == {"ok"}
    paths = dict(zip(recorded["slide_id"], recorded["path"]))
    assert all(paths[p.stem] == str(p) for p in moved.glob("*.tif"))  # the record follows a moved file

    # asked for: the slides are tiled again at the new mpp
    replanned = run_build(small_config(cache, [slides], mpp_override=0.4, replan_changed=True))
    assert replanned.slides_ok == first.slides_ok and replanned.targets_written == replanned.views
    assert set(CacheReader(str(cache)).slides()["mpp"].to_list()) == {0.4}
