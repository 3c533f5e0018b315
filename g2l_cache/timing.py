"""Timing of batch loops: how long each batch waited for its loader, and the steady rate."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator


def timed_iter(iterable: Iterable) -> Iterator[tuple[float, object]]:
    """Yield (seconds spent waiting for the item, item): where a loop stalls on its data."""
    it = iter(iterable)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        yield time.perf_counter() - t, item


WARMUP_SHARE = 0.25


def warmup_count(n: int, warmup: float = WARMUP_SHARE) -> int:
    """How many of n batches (or steps) count as warm-up: the first `warmup` share, at least one."""
    return max(1, int(n * warmup))


class BatchClock:
    """When each batch of a loop arrived, how big it was and how long it waited for its loader."""

    def __init__(self):
        self.arrivals: list[float] = []
        self.sizes: list[int] = []
        self.waits: list[float] = []
        self.end: float | None = None

    def arrived(self, size: int, waited: float) -> None:
        self.arrivals.append(time.perf_counter())
        self.sizes.append(size)
        self.waits.append(waited)

    def finished(self) -> None:
        self.end = time.perf_counter()

    @property
    def waited(self) -> float:
        """Seconds the loop waited for its loader in all, the first batch (start-up) included."""
        return sum(self.waits)

    def seconds(self) -> float:
        """From the first batch's arrival to the end: the loop without its start-up."""
        if self.end is None or not self.arrivals:
            return 0.0
        return self.end - self.arrivals[0]

    def wait_share(self) -> float:
        """Share of seconds() spent waiting for the loader (the start-up wait left out)."""
        seconds = self.seconds()
        return sum(self.waits[1:]) / seconds if seconds > 0 else 0.0

    def steady_rate(self, warmup: float = WARMUP_SHARE) -> float:
        """Items/s from the arrival of the first batch after the warm-up share to the end.

        Start-up (worker processes, device warm-up) is a one-off that a long run never sees; at
        least the first batch is always left out. 0.0 when there is too little to measure.
        """
        skip = warmup_count(len(self.arrivals), warmup)
        if self.end is None or len(self.arrivals) <= skip or self.end <= self.arrivals[skip]:
            return 0.0
        return sum(self.sizes[skip:]) / (self.end - self.arrivals[skip])
