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
    clock = fake_clock(monkeypatch)
    batches = BatchClock()
    for t, waited in ((0.0, 5.0), (5.0, 0.1), (6.0, 0.0), (7.0, 0.0)):  # a slow first batch
        clock.now = t
        batches.arrived(10, waited)
    clock.now = 8.0
    batches.finished()
    assert batches.steady_rate() == 30 / 3  # from batch 1 (first quarter skipped) to the end
    assert batches.steady_rate(warmup=0.5) == 20 / 2
    assert abs(batches.waited - 5.1) < 1e-12
    assert batches.seconds() == 8.0 and abs(batches.wait_share() - 0.1 / 8) < 1e-12  # start-up wait left out
    assert [warmup_count(n) for n in (1, 4, 40, 59)] == [1, 1, 10, 14]  # the rule the benchmarks share
    short = BatchClock()
    short.arrived(10, 0.0)
    short.finished()
    assert short.steady_rate() == 0.0  # one batch: nothing left after the warm-up
