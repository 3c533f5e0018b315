"""Loop timing: loader waits and the steady rate after warm-up, on a fake clock."""

import types

import g2l_cache.timing as timing
from g2l_cache.timing import BatchClock, timed_iter, warmup_count


def fake_clock(monkeypatch) -> types.SimpleNamespace:
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    return clock


def test_timed_iter_reports_how_long_each_item_kept_the_loop_waiting(monkeypatch):
    clock = fake_clock(monkeypatch)

    def loader():
        for wait in (0.5, 0.0, 2.0):
            clock.now += wait
            yield wait

    seen = []
    for waited, item in timed_iter(loader()):
        seen.append((waited, item))
        clock.now += 1.0  # the loop body's own work is not a wait
    assert seen == [(0.5, 0.5), (0.0, 0.0), (2.0, 2.0)]


def test_steady_rate_leaves_out_the_warm_up_batches(monkeypatch):
    # A loader that needs 5 s to start, then delivers 10 views every second: the rate a user
    # plans with is 10 views/s, not the 200 views / 25 s = 8 views/s of the whole run.
    clock = fake_clock(monkeypatch)
    batches = BatchClock()
    clock.now = 5.0
    batches.arrived(10, 5.0)
    for i in range(1, 20):
        clock.now = 5.0 + i
        batches.arrived(10, 0.0)
    clock.now = 25.0
    batches.finished()
    assert batches.steady_rate() == 10.0 and batches.seconds() == 20.0  # the loop after its first batch
    assert batches.wait_share() == 0.0  # the start-up wait is not a data-loading bottleneck
    assert [warmup_count(n) for n in (1, 4, 40, 59)] == [1, 1, 10, 14]  # the rule the benchmarks share
    short = BatchClock()
    short.arrived(10, 0.0)
    short.finished()
    assert short.steady_rate() == 0.0  # one batch: nothing left after the warm-up
