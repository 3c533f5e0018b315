"""LMDB shards: checksummed values, keyed tile bytes / targets / slide records, a background writer."""

from __future__ import annotations

import os
import queue
import struct
import threading
import zlib
from pathlib import Path

import lmdb
import numpy as np

from g2l_cache.errors import G2LError

INITIAL_MAP_SIZE = 1 << 28  # 256 MiB; doubled whenever a transaction does not fit


class CorruptValue(G2LError):
    """A stored value whose checksum does not match."""


def pack(payload: bytes) -> bytes:
    """Append a CRC32 so every value carries its own checksum."""
    return payload + struct.pack("<I", zlib.crc32(payload))


def unpack(value: bytes, key: bytes = b"?") -> bytes:
    """Strip and verify the checksum; raise CorruptValue if the value was damaged."""
    if len(value) < 4:
        raise CorruptValue(f"value for {key.decode(errors='replace')} is truncated.")
    payload, (crc,) = value[:-4], struct.unpack("<I", value[-4:])
    if zlib.crc32(payload) != crc:
        raise CorruptValue(f"checksum mismatch for {key.decode(errors='replace')}.")
    return payload


def tile_key(tile_id: str) -> bytes:
    return f"tile/{tile_id}".encode()


def target_key(teacher_fp: str, view_id: str) -> bytes:
    return f"tgt/{teacher_fp}/{view_id}".encode()


def target_prefix(teacher_fp: str) -> bytes:
    return f"tgt/{teacher_fp}/".encode()


def slide_key(slide_id: str) -> bytes:
    return f"slide/{slide_id}".encode()


def encode_target(emb: np.ndarray, patch: np.ndarray) -> bytes:
    """One view's targets as fp16 [embedding | mean patch]."""
    return np.concatenate([emb, patch]).astype(np.float16).tobytes()


def decode_target(payload: bytes, embed_dim: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.frombuffer(payload, dtype=np.float16)
    return arr[:embed_dim], arr[embed_dim:]


_OPEN: dict[str, tuple[int, lmdb.Environment, bool]] = {}


def shared_env(path: Path, write: bool = False) -> lmdb.Environment:
    """The one environment of this shard in this process (LMDB allows one per process and path).

    Readers get the writer's environment when this process is writing the shard; a writer replaces
    a read-only one. A forked child never reuses its parent's handles.
    """
    key, pid = os.path.realpath(path), os.getpid()
    entry = _OPEN.get(key)
    if entry is not None and entry[0] == pid:
        if not write or entry[2]:
            return entry[1]
        entry[1].close()
    if not write and not Path(path).exists():
        raise G2LError(f"cache shard {path} is missing; the cache is incomplete.")
    if write:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=INITIAL_MAP_SIZE, subdir=True, readonly=not write,
                    lock=True, readahead=False, max_dbs=0, max_readers=512)
    _OPEN[key] = (pid, env, write)
    return env


def close_env(path: Path) -> None:
    """Close this process's environment of a shard, if open."""
    entry = _OPEN.pop(os.path.realpath(path), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


def get_value(env: lmdb.Environment, key: bytes) -> bytes | None:
    """Read and verify one value; follows a map the writer has grown meanwhile."""
    try:
        with env.begin() as txn:
            value = txn.get(key)
    except lmdb.MapResizedError:
        env.set_mapsize(0)
        with env.begin() as txn:
            value = txn.get(key)
    return None if value is None else unpack(value, key)


class ShardWriter:
    """Writes batches to one shard, one transaction per batch, growing the map when it fills."""

    def __init__(self, path: Path):
        self.path = path
        self.env = shared_env(path, write=True)

    def commit(self, puts: list[tuple[bytes, bytes]]) -> None:
        """Write all (key, payload) pairs atomically; payloads get checksums here."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, payload in puts:
                        txn.put(key, pack(payload))
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def has(self, key: bytes) -> bool:
        with self.env.begin() as txn:
            return txn.get(key) is not None

    def missing(self, keys: list[bytes]) -> list[bool]:
        """For each key, True if it is not stored."""
        with self.env.begin() as txn:
            return [txn.get(k) is None for k in keys]

    def get(self, key: bytes) -> bytes | None:
        return get_value(self.env, key)

    def close(self) -> None:
        close_env(self.path)


class BackgroundWriter:
    """Commits batches on a thread so writing stays off the compute path; errors surface on put/close."""

    def __init__(self, writers: dict[int, ShardWriter], depth: int = 8):
        self.writers = writers
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="g2l-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            shard, puts, callback = item
            if self.error is None:
                try:
                    self.writers[shard].commit(puts)
                    if callback is not None:
                        callback()
                except BaseException as exc:  # re-raised in the main thread
                    self.error = exc

    def put(self, shard: int, puts: list[tuple[bytes, bytes]], callback=None) -> None:
        """Queue one atomic batch for `shard`; blocks when the queue is full (back-pressure)."""
        self._raise()
        self.queue.put((shard, puts, callback))

    def close(self) -> None:
        """Wait for every queued batch to be committed."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise G2LError(f"writing to the cache failed: {self.error}") from self.error


def iter_prefix(env: lmdb.Environment, prefix: bytes, values: bool = True):
    """Yield (key, value) for every key that starts with prefix, in key order."""
    with env.begin() as txn:
        cur = txn.cursor()
        if not cur.set_range(prefix):
            return
        for key, value in cur:
            if not key.startswith(prefix):
                return
            yield key, (value if values else None)
