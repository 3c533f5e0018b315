"""A plan worker that dies (the OOM killer's SIGKILL, a segfault) fails its own slide only: the others
are planned, in order, and the dead one's error says how its worker ended."""

import os

from pool_items import square_unless_told_to_die
from g2l_cache.plan_pool import map_surviving
from g2l_cache.workers import worker_init


def test_a_worker_that_dies_fails_its_item_and_the_rest_go_on():
    deaths = {3: "SIGKILL", 8: "SIGSEGV"}
    items = [(i, deaths.get(i)) for i in range(12)]
    results = list(map_surviving(square_unless_told_to_die, items, 2, worker_init, (os.getpid(),),
                                 lambda item, how: f"item {item[0]}: {how}"))
    assert results[:3] == [0, 1, 4] and results[4:8] == [16, 25, 36, 49] and results[9:] == [81, 100, 121]
    assert results[3].startswith("item 3: killed by SIGKILL: most often the out-of-memory killer")
    assert results[8].startswith("item 8: killed by SIGSEGV: a crash in the slide-reading library")
