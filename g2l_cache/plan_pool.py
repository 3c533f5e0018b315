"""Plan workers that may die: a slide whose worker is killed (the out-of-memory killer, a crash in a
slide library) is recorded as failed, and the other slides go on in a fresh pool.

A dead worker breaks a whole ProcessPoolExecutor: every slide in it raises BrokenProcessPool, with no
word of which one killed it. So at most 2 x workers slides are in flight; when the pool breaks, those
whose results had not come back are planned again one by one, each in its own process, which tells
the slide that kills its worker (and how: the signal) from the ones that were only beside it.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator


def map_surviving(fn: Callable, items: list[tuple], workers: int, initializer: Callable, initargs: tuple,
                  on_death: Callable[[tuple, str], object]) -> Iterator:
    """`fn(*item)` of each item, in order, in spawned worker processes; an item whose worker dies
    yields `on_death(item, how)` instead (`how` says how the process ended)."""
    context = multiprocessing.get_context("spawn")
    todo = deque(items)
    in_flight: deque = deque()  # (item, future) in the order given
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer,
                               initargs=initargs)
    try:
        while todo or in_flight:
            try:
                while todo and len(in_flight) < 2 * workers:
                    in_flight.append((todo[0], pool.submit(fn, *todo[0])))
                    todo.popleft()
                item, future = in_flight[0]
                result = future.result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                for item, future in in_flight:
                    done = future.done() and not future.cancelled() and future.exception() is None
                    yield future.result() if done else _alone(fn, item, context, initializer, initargs, on_death)
                in_flight.clear()
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer,
                                           initargs=initargs)
                continue
            in_flight.popleft()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _alone(fn: Callable, item: tuple, context, initializer: Callable, initargs: tuple,
           on_death: Callable[[tuple, str], object]):
    """`fn(*item)` in a process of its own: its result, or `on_death(item, how)` if the process dies."""
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run_and_send, args=(send, fn, item, initializer, initargs), daemon=True)
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # the process ended without sending: it died
        result = None
    process.join()
    if process.exitcode == 0 and result is not None:
        return result[0]
    return on_death(item, _how_it_ended(process.exitcode))


def _run_and_send(send, fn: Callable, item: tuple, initializer: Callable, initargs: tuple) -> None:
    initializer(*initargs)
    send.send((fn(*item),))
    send.close()


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.Signals._value2member_map_ else str(-exitcode)
        likely = {"SIGKILL": "most often the out-of-memory killer (check `dmesg` or the job's memory limit, "
                             "and lower --num-workers)",
                  "SIGSEGV": "a crash in the slide-reading library on this file",
                  "SIGBUS": "the file changed or its storage failed while it was read"}.get(name, "")
        return f"killed by {name}" + (f": {likely}" if likely else "")
    return f"exited with code {exitcode}"
