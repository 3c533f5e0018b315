"""`--stage-dir`: slides on slow shared storage copied to local disk a few ahead of the teacher pass.

A build reads a slide's full-resolution level in its second phase. With a stage folder, a thread of
the main process copies the slides of that phase, in the order they will be read, into a private
folder under it (`g2l-stage-HOST-PID`), keeping at most `ahead` copies that are not read yet; a loader
worker opens the local copy once it is complete (it waits for it) and the copy is deleted as soon
as the slide's last chunk has come out of the loader. The cache records the original paths only.
Slides whose data is more than one file (MIRAX's folder, DICOM and Zarr folders) are read in place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from g2l_cache.errors import G2LError
from g2l_cache.workers import process_alive

IN_PLACE_SUFFIXES = (".mrxs", ".vms", ".vmu")  # a header file with the pixel data in other files
WAIT_POLL_S = 0.05
WAIT_LIMIT_S = 3600.0  # a worker then reads the slide where it is


def stageable(path: str) -> bool:
    """True for a slide whose data is this one file."""
    return Path(path).is_file() and Path(path).suffix.lower() not in IN_PLACE_SUFFIXES


def staged_name(slide_id: str, path: str) -> str:
    """The local copy's file name: unique per slide, keeping the suffix readers go by."""
    return hashlib.blake2b(slide_id.encode(), digest_size=10).hexdigest() + Path(path).suffix.lower()


def failed_marker(staged: str) -> Path:
    return Path(staged + ".unstaged")


class SlideStager:
    """Copies slides (slide_id, path) in order into a private folder under `stage_dir`, at most
    `ahead` not yet released; `release` deletes a slide's copy, `close` the folder."""

    def __init__(self, stage_dir: str | Path, slides: list[tuple[str, str]], ahead: int):
        base = Path(stage_dir).expanduser()
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise G2LError(f"--stage-dir {base} cannot be created ({exc.strerror}); pass a folder on local disk "
                           "that you can write.") from None
        remove_stale_stages(base)
        self.folder = base / f"g2l-stage-{socket.gethostname()}-{os.getpid()}"
        self.folder.mkdir(exist_ok=True)
        self.order = [(sid, path) for sid, path in slides if stageable(path)]
        self.in_place = len(slides) - len(self.order)
        self.targets = {sid: str(self.folder / staged_name(sid, path)) for sid, path in self.order}
        self.slots = threading.Semaphore(ahead)
        self.released: set[str] = set()
        self.done: set[str] = set()  # copied (or failed to copy)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.copied_bytes = 0
        self.thread = threading.Thread(target=self._copy_all, name="g2l-stage", daemon=True)
        self.thread.start()

    def _copy_all(self) -> None:
        for sid, path in self.order:
            self.slots.acquire()
            if self.stopping.is_set():
                return
            with self.lock:
                if sid in self.released:  # read in place before its turn came (e.g. the slide failed)
                    self.slots.release()
                    continue
            target = self.targets[sid]
            part = target + ".part"
            try:
                self.copied_bytes += copy_file(path, part, self.stopping)
                os.replace(part, target)
            except _Stopped:
                return
            except OSError as exc:  # full or unwritable local disk: that slide is read where it is
                try:
                    Path(part).unlink(missing_ok=True)
                    failed_marker(target).write_text(f"{exc}")
                except OSError:
                    pass
            with self.lock:
                self.done.add(sid)
                if sid in self.released:  # released while it was being copied
                    self._delete(sid)

    def paths(self) -> dict[str, str]:
        """slide_id -> where its local copy appears (for the loader workers)."""
        return dict(self.targets)

    def release(self, slide_id: str) -> None:
        """The slide is read: delete its copy and let the next one be copied."""
        with self.lock:
            if slide_id not in self.targets or slide_id in self.released:
                return
            self.released.add(slide_id)
            if slide_id in self.done:  # else the copier deletes it, or skips it, when it gets there
                self._delete(slide_id)

    def _delete(self, slide_id: str) -> None:
        target = self.targets[slide_id]
        Path(target).unlink(missing_ok=True)
        failed_marker(target).unlink(missing_ok=True)
        self.slots.release()

    def close(self) -> None:
        """Stop copying and delete the stage folder."""
        self.stopping.set()
        self.slots.release()
        self.thread.join(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "SlideStager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stopped(Exception):
    pass


def copy_file(source: str, target: str, stopping: threading.Event, piece: int = 64 << 20) -> int:
    """Copy a file in pieces (in the kernel where it can), stopping between pieces when asked;
    return its bytes."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size, done = os.fstat(src.fileno()).st_size, 0
        while done < size:
            if stopping.is_set():
                raise _Stopped()
            try:
                sent = os.sendfile(dst.fileno(), src.fileno(), done, min(piece, size - done))
            except OSError:  # no sendfile between these file systems
                src.seek(done)
                data = src.read(min(piece, size - done))
                sent = dst.write(data)
            if sent == 0:
                break
            done += sent
    return done


def local_copy(staged: str, limit_s: float = WAIT_LIMIT_S) -> str | None:
    """In a loader worker: the local copy's path once it is complete, or None (read the original)
    if copying it failed or it did not appear within `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if os.path.exists(staged):
            return staged
        if failed_marker(staged).exists():
            return None
        time.sleep(WAIT_POLL_S)
    return None


def remove_stale_stages(base: Path) -> None:
    """Delete stage folders left by builds on this machine that were killed (their process is gone)."""
    for folder in base.glob(f"g2l-stage-{socket.gethostname()}-*"):
        try:
            pid = int(folder.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
