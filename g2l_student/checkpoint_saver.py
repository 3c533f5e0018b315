"""Checkpoints written while training goes on: one save in flight, its failure never lost.

`save` waits for the previous save (if still writing), lets the caller take a snapshot (a copy of the
state, the only time training is held), and writes it on a background thread: files fsynced, the
folder renamed into place, old checkpoints pruned. A write that fails is raised by the next `save`
or by `close`; `close` waits for the last write, so a run never ends with its checkpoint half-done.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from g2l_cache.errors import G2LError
from g2l_student.checkpoint import Snapshot, write_snapshot
from g2l_student.rundir import RunDir


class CheckpointSaver:
    """Writes snapshots into a run's checkpoints folder, one at a time, on a background thread
    (`background=False`: in the caller, as a plain synchronous save)."""

    def __init__(self, run: RunDir, keep: int, background: bool = True):
        self.run, self.keep, self.background = run, keep, background
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.failed_at: Path | None = None
        self.held_seconds = 0.0  # training held: waiting for the previous write, and copying
        self.write_seconds = 0.0  # writing, off the training path when in the background
        self.saved = 0

    def save(self, take: Callable[[], Snapshot | None], folder: Path) -> None:
        """Snapshot with `take` and write it to `folder` (nothing to write when `take` returns None)."""
        started = time.perf_counter()
        self.wait()
        snapshot = take()
        if snapshot is not None and self.background:
            # not a daemon: an interpreter that exits while a checkpoint is being written finishes it first
            self.thread = threading.Thread(target=self._write, args=(snapshot, folder), name="g2l-checkpoint")
            self.thread.start()
        elif snapshot is not None:
            self._write(snapshot, folder)
        self.held_seconds += time.perf_counter() - started
        self._raise_failure()

    def _write(self, snapshot: Snapshot, folder: Path) -> None:
        started = time.perf_counter()
        try:
            write_snapshot(snapshot, folder)
            self.run.prune_checkpoints(self.keep)
            self.saved += 1
        except BaseException as exc:  # handed to the training thread at its next save or at close
            self.failure, self.failed_at = exc, folder
        self.write_seconds += time.perf_counter() - started

    def wait(self) -> None:
        """Block until the save in flight is on disk; raise if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            exc, folder = self.failure, self.failed_at
            self.failure = None
            raise G2LError(f"checkpoint {folder.name} could not be written to {folder.parent} ({exc}); the run "
                           "stopped. Free space or fix the folder, then --resume from the last complete "
                           "checkpoint.") from exc

    def close(self, raising: bool = True) -> None:
        """Wait for the last save; `raising=False` (the run is already failing) keeps its error quiet."""
        try:
            self.wait()
        except G2LError:
            if raising:
                raise

    def __enter__(self) -> "CheckpointSaver":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raising=exc_type is None)
