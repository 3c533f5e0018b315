"""DataLoader worker set-up shared by both stages: one thread each, and no worker outlives its run."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time

WATCH_SECONDS = 1.0


def loader_worker_init() -> functools.partial:
    """A worker_init_fn for DataLoaders started from this process."""
    return functools.partial(_init_worker, os.getpid())


def share_worker_imports(*modules: str) -> None:
    """Have the fork server import these modules before it forks DataLoader workers: the workers then
    share those pages with it instead of importing torch each (a build worker's PSS fell from ~350 MB
    to ~80 MB here). Takes effect when the process first starts its fork server."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(list(modules))


def worker_init(main_pid: int) -> None:
    """Set up a pool worker of the process `main_pid`: one thread, and exit when that process is gone."""
    _init_worker(main_pid, 0)


def _init_worker(main_pid: int, _worker_id: int) -> None:
    if "torch" in sys.modules:  # a worker that computes with torch: one thread each
        sys.modules["torch"].set_num_threads(1)
    # A forkserver worker's parent is the fork server, not the main process, so PyTorch's own
    # parent check never fires when the main process is killed (kill -9, OOM killer, preemption):
    # the worker would live on holding its memory. Watch the main process itself.
    threading.Thread(target=_exit_when_gone, args=(main_pid,), name="g2l-watchdog", daemon=True).start()


def _exit_when_gone(pid: int) -> None:
    while process_alive(pid):
        time.sleep(WATCH_SECONDS)
    os._exit(1)


def process_alive(pid: int) -> bool:
    """True while process `pid` runs on this machine (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
