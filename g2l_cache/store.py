"""Shard storage: a small LMDB index beside append-only tile bytes and fixed-row target files.

A shard is a folder `shards/NNNNN/` written by one process at a time:
  index.lmdb/         slide records, per-slide tile and view tables (Arrow IPC), tile locations,
                      per-teacher bitmaps of committed targets, and counters (all CRC-checked);
  tiles.bin           encoded tiles back to back, appended; its committed length lives in the index;
  targets/<fp>.bin    one fixed-size row per view: fp16 [embedding | mean patch] + CRC32.
A batch is written to the data files first and then committed in one index transaction, so a crash
loses at most the batches in flight; bytes past the committed length are cut on the next open.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa

from g2l_cache.disk_full import is_disk_full, write_fully
from g2l_cache.errors import G2LError

INITIAL_MAP_SIZE = 1 << 26  # 64 MiB; doubled whenever a transaction does not fit
CRC_BYTES = 4


class CorruptValue(G2LError):
    """A stored value whose checksum does not match."""


class NonFiniteTargets(G2LError):
    """Teacher outputs that fp16 cannot store (NaN, infinite, beyond 65504): the batch's slide fails."""


def pack(payload: bytes) -> bytes:
    """Append a CRC32 so every value carries its own checksum."""
    return payload + struct.pack("<I", zlib.crc32(payload))


def unpack(value: bytes, key: bytes = b"?") -> bytes:
    """Strip and verify the checksum; raise CorruptValue if the value was damaged."""
    if len(value) < CRC_BYTES:
        raise CorruptValue(f"value for {key.decode(errors='replace')} is truncated.")
    payload, (crc,) = value[:-CRC_BYTES], struct.unpack("<I", value[-CRC_BYTES:])
    if zlib.crc32(payload) != crc:
        raise CorruptValue(f"checksum mismatch for {key.decode(errors='replace')}.")
    return payload


# -- keys of the index ---------------------------------------------------------------------------
def slide_key(slide_id: str) -> bytes:
    return f"slide/{slide_id}".encode()


def tiles_key(slide_id: str) -> bytes:
    return f"tiles/{slide_id}".encode()


def views_key(slide_id: str) -> bytes:
    return f"views/{slide_id}".encode()


def tloc_key(slide_id: str) -> bytes:
    return f"tloc/{slide_id}".encode()


def done_key(slide_id: str, teacher_fp: str) -> bytes:
    return f"done/{slide_id}/{teacher_fp}".encode()


def canary_key(slide_id: str) -> bytes:
    """Digest of the input tensor of the slide's first view, as the teacher saw it (g2l_cache.canary)."""
    return f"canary/{slide_id}".encode()


def spent_key(teacher_fp: str, device: str) -> bytes:
    """Teacher time and views committed to this shard on one kind of device: "milliseconds views"."""
    return f"spent/{teacher_fp}/{device}".encode()


META_ROWS, META_TILE_BYTES, META_GENERATION = b"meta/rows", b"meta/tile_bytes", b"meta/generation"


# -- data encodings ------------------------------------------------------------------------------
# `cache verify --recompute`: recomputed targets may differ from the stored ones by this share of the
# stored targets' largest magnitude. The stored fp16 rows round at 2^-11 of it; a teacher computed in
# bf16 differs from fp32 by under 1% (a ViT-S measured 0.9%), and from bf16 on another device by about
# as much; wrong weights, preprocessing or views differ by tens of percent.
RECOMPUTE_TOLERANCE = 0.02


def target_row_bytes(embed_dim: int, patch_dim: int) -> int:
    """Bytes of one target row on disk: fp16 embedding and mean patch, then a CRC32."""
    return 2 * (embed_dim + patch_dim) + CRC_BYTES


def encode_targets(emb: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """Rows of fp16 [embedding | mean patch] + CRC32, as an (n, row bytes) uint8 array.

    Non-finite values (NaN, or overflow past fp16's 65504) are refused: they would poison a student.
    """
    with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
        payload = np.ascontiguousarray(np.concatenate([emb, patch], axis=1).astype("<f2"))
    bad = ~np.isfinite(payload).all(axis=1)
    if bad.any():
        raise NonFiniteTargets(f"the teacher produced non-finite targets (NaN or beyond fp16's range) for "
                               f"{int(bad.sum())} of {len(payload)} views; nothing was stored. Check the "
                               "teacher weights and its mean/std; a teacher whose features exceed 65504 "
                               "cannot be cached in fp16.")
    raw = payload.view(np.uint8).reshape(len(payload), -1)
    crcs = np.array([zlib.crc32(r) for r in raw], dtype="<u4").view(np.uint8).reshape(-1, CRC_BYTES)
    return np.concatenate([raw, crcs], axis=1)


def decode_target(row: bytes | np.ndarray, embed_dim: int, where: str = "target") -> tuple[np.ndarray, np.ndarray]:
    """(embedding, mean patch) fp16 arrays of one stored row, after checking its CRC."""
    buf = memoryview(row).cast("B") if not isinstance(row, np.ndarray) else row
    payload = bytes(buf[:-CRC_BYTES])
    (crc,) = struct.unpack("<I", bytes(buf[-CRC_BYTES:]))
    if zlib.crc32(payload) != crc:
        raise CorruptValue(f"checksum mismatch for {where}.")
    arr = np.frombuffer(payload, dtype="<f2")
    return arr[:embed_dim], arr[embed_dim:]


def read_stored_tile(fd: int, offset: int, length: int, crc: int, what: str) -> bytes:
    """One tile's encoded bytes from an open tiles.bin, checksum verified."""
    data = os.pread(fd, int(length), int(offset))
    if len(data) != length or zlib.crc32(data) != crc:
        raise CorruptValue(f"checksum mismatch for {what}; run `g2l cache verify`.")
    return data


def table_to_bytes(table: pa.Table) -> bytes:
    """An Arrow table as LZ4-compressed IPC stream bytes (how per-slide tables sit in the index).

    LZ4 takes a slide's view table from ~300 to ~75 bytes per view and reads back in under a ms."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def bits_from_bytes(data: bytes | None, n: int) -> np.ndarray:
    """A bool array of n committed flags from a packed bitmap (all False if none stored)."""
    if data is None:
        return np.zeros(n, dtype=bool)
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n, bitorder="little").astype(bool)


def bits_to_bytes(bits: np.ndarray) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes()


TLOC_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i8"), ("crc", "<i8")])


def empty_tloc(n_tiles: int) -> np.ndarray:
    out = np.zeros(n_tiles, dtype=TLOC_DTYPE)
    out["offset"] = -1
    return out


def raise_open_file_limit(wanted: int = 65536) -> None:
    """Raise this process's soft limit of open files towards `wanted` (within the hard limit): a build
    or a fit over a cache of a thousand shards may hold more than the common default of 1,024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: the caps below still hold
        pass


raise_open_file_limit()


# -- environments ----------------------------------------------------------------------------------
_OPEN: dict[str, tuple[int, lmdb.Environment, bool]] = {}
# Growing the map while another thread of this process holds a read transaction is undefined
# behaviour in LMDB: reads and growth of one environment take this lock.
_MAP_LOCKS: dict[str, threading.Lock] = {}


def _map_lock(path: Path) -> threading.Lock:
    return _MAP_LOCKS.setdefault(os.path.realpath(path), threading.Lock())


def index_path(shard_dir: Path) -> Path:
    return Path(shard_dir) / "index.lmdb"


def shared_env(shard_dir: Path, write: bool = False, lock: bool = True) -> lmdb.Environment:
    """The one index environment of this shard in this process (LMDB allows one per path).

    Readers get the writer's environment when this process is writing the shard. `lock=False`
    is for finished caches only: no lock file, so read-only folders and other users' caches open.
    A forked child never reuses its parent's handles.
    """
    path = index_path(shard_dir)
    key, pid = os.path.realpath(path), os.getpid()
    entry = _OPEN.get(key)
    if entry is not None and entry[0] == pid:
        if not write or entry[2]:
            return entry[1]
        entry[1].close()
    if not write and not path.exists():
        raise G2LError(f"cache shard {shard_dir} is missing; the cache is incomplete.")
    if write:
        path.mkdir(parents=True, exist_ok=True)
    try:
        env = lmdb.open(str(path), map_size=INITIAL_MAP_SIZE, subdir=True, readonly=not write,
                        lock=lock or write, readahead=False, max_dbs=0, max_readers=1024)
    except lmdb.Error as exc:
        raise G2LError(f"cannot open cache shard {shard_dir} ({exc}); a build needs write access "
                       "to the cache folder.") from None
    _OPEN[key] = (pid, env, write)
    return env


def close_reader_env(shard_dir: Path) -> None:
    """Close this process's index environment of a shard if it was opened for reading (a writer's stays)."""
    entry = _OPEN.get(os.path.realpath(index_path(shard_dir)))
    if entry is not None and not entry[2]:
        close_env(shard_dir)


def close_env(shard_dir: Path) -> None:
    """Close this process's index environment of a shard, if open."""
    entry = _OPEN.pop(os.path.realpath(index_path(shard_dir)), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


def get_value(env: lmdb.Environment, key: bytes) -> bytes | None:
    """Read and verify one value; follows a map another process has grown meanwhile."""
    with _map_lock(Path(env.path())):
        try:
            with env.begin() as txn:
                value = txn.get(key)
        except lmdb.MapResizedError:
            env.set_mapsize(0)
            with env.begin() as txn:
                value = txn.get(key)
    return None if value is None else unpack(value, key)


def iter_prefix(env: lmdb.Environment, prefix: bytes, values: bool = True):
    """Yield (key, value) for every key that starts with prefix, in key order (values unchecked)."""
    with env.begin() as txn:
        cur = txn.cursor()
        if not cur.set_range(prefix):
            return
        for key, value in cur.iternext(keys=True, values=values):
            if not key.startswith(prefix):
                return
            yield key, (value if values else None)


def read_int(env: lmdb.Environment, key: bytes) -> int:
    value = get_value(env, key)
    return 0 if value is None else int(value)


class ShardWriter:
    """The single writer of one shard: plans slides, appends tiles, writes target rows, commits."""

    def __init__(self, shard_dir: Path, durable: bool = True):
        self.dir = Path(shard_dir)
        self.env = shared_env(self.dir, write=True)
        self.durable = durable
        self.tiles_path = self.dir / "tiles.bin"
        # Bytes past the committed length are a batch that never committed: cut them.
        self.tile_end = read_int(self.env, META_TILE_BYTES)
        self.tiles_fd = os.open(self.tiles_path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self.tiles_fd).st_size != self.tile_end:
            os.ftruncate(self.tiles_fd, self.tile_end)
        self.target_fds: dict[str, int] = {}

    # -- index transactions ----------------------------------------------------------------------
    def _write(self, fn) -> object:
        """Run fn(txn) in one write transaction (bumping the generation), growing the map as needed."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    result = fn(txn)
                    gen = txn.get(META_GENERATION)
                    txn.put(META_GENERATION, pack(str(int(unpack(gen)) + 1 if gen else 1).encode()))
                return result
            except lmdb.MapFullError:
                with _map_lock(index_path(self.dir)):
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)

    @staticmethod
    def _get(txn, key: bytes) -> bytes | None:
        value = txn.get(key)
        return None if value is None else unpack(value, key)

    def get(self, key: bytes) -> bytes | None:
        return get_value(self.env, key)

    def record(self, slide_id: str) -> dict | None:
        value = self.get(slide_key(slide_id))
        return None if value is None else json.loads(value)

    def done(self, slide_id: str, teacher_fp: str, n_views: int) -> np.ndarray:
        """Which of a slide's views have a committed target of this teacher."""
        return bits_from_bytes(self.get(done_key(slide_id, teacher_fp)), n_views)

    def tile_locations(self, slide_id: str) -> np.ndarray | None:
        value = self.get(tloc_key(slide_id))
        return None if value is None else np.frombuffer(value, dtype=TLOC_DTYPE)

    def put_record(self, record: dict) -> None:
        """Store a slide record as it is (e.g. a slide that failed)."""
        self._write(lambda txn: txn.put(slide_key(record["slide_id"]), pack(json.dumps(record).encode())))

    def plan_slide(self, record: dict, tiles_ipc: bytes | None, views_ipc: bytes | None) -> dict:
        """Commit a (re)planned slide: record, tile and view tables, and its target rows.

        A slide gets `n_tiles * K` consecutive target rows; a re-planned slide keeps its old rows
        when they are enough. Any earlier tiles and targets of the slide are forgotten."""
        sid = record["slide_id"]
        n_views = record.get("n_views", 0)

        def fn(txn):
            old = self._get(txn, slide_key(sid))
            old = json.loads(old) if old else {}
            if old.get("row_capacity", 0) >= n_views:  # also a failed slide (no views): keep rows
                record.update(row_start=old.get("row_start", 0), row_capacity=old.get("row_capacity", 0))
            else:
                start = int(self._get(txn, META_ROWS) or 0)
                record.update(row_start=start, row_capacity=n_views)
                txn.put(META_ROWS, pack(str(start + n_views).encode()))
            cur = txn.cursor()
            prefix = f"done/{sid}/".encode()
            stale = []
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    stale.append(bytes(key))
            for key in stale:
                txn.delete(key)
            txn.delete(canary_key(sid))  # new tiles, new first view
            txn.put(slide_key(sid), pack(json.dumps(record).encode()))
            if tiles_ipc is not None:
                txn.put(tiles_key(sid), pack(tiles_ipc))
                txn.put(views_key(sid), pack(views_ipc))
                txn.put(tloc_key(sid), pack(empty_tloc(record["n_tiles"]).tobytes()))
            return record

        return self._write(fn)

    # -- data ------------------------------------------------------------------------------------
    def _target_fd(self, teacher_fp: str) -> int:
        if teacher_fp not in self.target_fds:
            path = self.dir / "targets" / f"{teacher_fp}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.target_fds[teacher_fp] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        return self.target_fds[teacher_fp]

    def commit(self, slide_id: str, row_start: int, n_views: int, teacher_fp: str,
               view_indices: np.ndarray, rows: np.ndarray, new_tiles: list[tuple[int, bytes]],
               spent: tuple[str, int] | None = None, canary: str | None = None) -> None:
        """Store one batch of one slide: target rows of views `view_indices` (from
        `encode_targets`) and the encoded bytes of tiles stored for the first time. `spent`:
        (device, whole milliseconds) the batch cost, added to the shard's ledger in the same
        transaction, so the time of a build killed half-way is kept with the targets it paid for.
        `canary`: the digest of the slide's first view, kept from the first batch that has one."""
        fd = self._target_fd(teacher_fp)
        stride = rows.shape[1]
        view_indices = np.asarray(view_indices, dtype=np.int64)
        # Consecutive views are written with one call each run.
        breaks = np.flatnonzero(np.diff(view_indices) != 1) + 1
        for run_rows, run_views in zip(np.split(rows, breaks), np.split(view_indices, breaks)):
            write_fully(fd, run_rows.tobytes(), (row_start + int(run_views[0])) * stride)
        placed = []
        if new_tiles:
            # This process is the shard's only writer, so the stored locations are current: a tile
            # that two batches both read from the slide (its views split over them) is stored once.
            stored = self.tile_locations(slide_id)["offset"] >= 0
            new_tiles = [(t, data) for t, data in dict(new_tiles).items() if not stored[t]]
        for tile_index, data in new_tiles:
            write_fully(self.tiles_fd, data, self.tile_end)
            placed.append((tile_index, self.tile_end, len(data), zlib.crc32(data)))
            self.tile_end += len(data)
        if self.durable:
            os.fdatasync(fd)
            if placed:
                os.fdatasync(self.tiles_fd)
        tile_end = self.tile_end

        def fn(txn):
            if placed:
                tloc = np.frombuffer(self._get(txn, tloc_key(slide_id)), dtype=TLOC_DTYPE).copy()
                for tile_index, offset, length, crc in placed:
                    tloc[tile_index] = (offset, length, crc)
                txn.put(tloc_key(slide_id), pack(tloc.tobytes()))
                txn.put(META_TILE_BYTES, pack(str(tile_end).encode()))
            key = done_key(slide_id, teacher_fp)
            bits = bits_from_bytes(self._get(txn, key), n_views)
            bits[view_indices] = True
            txn.put(key, pack(bits_to_bytes(bits)))
            if canary is not None and txn.get(canary_key(slide_id)) is None:
                txn.put(canary_key(slide_id), pack(canary.encode()))
            if spent is not None:
                key = spent_key(teacher_fp, spent[0])
                ms, views = (int(v) for v in (self._get(txn, key) or b"0 0").split())
                txn.put(key, pack(f"{ms + spent[1]} {views + len(view_indices)}".encode()))

        self._write(fn)

    def close(self) -> None:
        for fd in [self.tiles_fd, *self.target_fds.values()]:
            os.close(fd)
        self.target_fds = {}
        close_env(self.dir)


class BackgroundWriter:
    """Runs commits on a thread so writing stays off the compute path; errors surface on put/close."""

    def __init__(self, depth: int = 8):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="g2l-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                fn, args = item
                try:
                    fn(*args)
                except BaseException as exc:  # re-raised in the main thread
                    self.error = exc

    def put(self, fn, *args) -> None:
        """Queue one call (one atomic commit); blocks when the queue is full (back-pressure)."""
        self._raise()
        self.queue.put((fn, args))

    def close(self) -> None:
        """Wait for every queued commit."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            if isinstance(self.error, G2LError) or is_disk_full(self.error):
                raise self.error
            raise G2LError(f"writing to the cache failed: {self.error}") from self.error


def read_spent(env: lmdb.Environment) -> dict[str, dict[str, dict[str, float]]]:
    """A shard's ledger: teacher fingerprint -> device -> {"device_seconds", "views"} committed."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in iter_prefix(env, b"spent/"):
        _, fp, device = bytes(key).decode().split("/", 2)
        ms, views = (int(v) for v in unpack(value, key).split())
        out.setdefault(fp, {})[device] = {"device_seconds": ms / 1000, "views": views}
    return out
