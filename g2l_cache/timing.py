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


class BatchClock:
    """When each batch of a loop arrived and how big it was, for its rate once warmed up."""

    def __init__(self):
        self.arrivals: list[float] = []
        self.sizes: list[int] = []
        self.waited = 0.0
        self.end: float | None = None

    def arrived(self, size: int, waited: float) -> None:
        self.arrivals.append(time.perf_counter())
        self.sizes.append(size)
        self.waited += waited

    def finished(self) -> None:
        self.end = time.perf_counter()

    def steady_rate(self, warmup: float = 0.25) -> float:
        """Items/s from the arrival of the first batch after the warm-up share to the end.

        Start-up (worker processes, device warm-up) is a one-off that a long run never sees; at
        least the first batch is always left out. 0.0 when there is too little to measure.
        """
        skip = max(1, int(len(self.arrivals) * warmup))
        if self.end is None or len(self.arrivals) <= skip or self.end <= self.arrivals[skip]:
            return 0.0
        return sum(self.sizes[skip:]) / (self.end - self.arrivals[skip])
