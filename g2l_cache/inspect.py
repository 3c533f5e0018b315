"""`g2l cache info` and `g2l cache verify`: what a cache holds, and whether it is intact."""

from __future__ import annotations

import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from g2l_cache.canary import check_canaries
from g2l_cache.cpus import usable_cores
from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout, dir_bytes, read_manifest
from g2l_cache.plan import read_plan
from g2l_cache.reader import CacheReader
from g2l_cache.store import (CRC_BYTES, RECOMPUTE_TOLERANCE, CorruptValue, bits_from_bytes, close_env,
                             done_key, get_value, index_path, iter_prefix, shared_env, target_row_bytes, unpack)

READ_BLOCK = 1 << 24  # bytes per read while checking data files


def teacher_seconds(teacher: dict) -> float:
    """Device-seconds the teacher's targets in this cache cost, over every build that wrote them:
    the per-batch time committed with the targets (kept by builds killed half-way too)."""
    return float(sum(d["device_seconds"] for d in teacher.get("spent", {}).values()))


def teacher_views_paid(teacher: dict) -> int:
    """Views whose teacher time `teacher_seconds` counts."""
    return int(sum(d["views"] for d in teacher.get("spent", {}).values()))


def teacher_devices(teacher: dict) -> list[str]:
    """The devices the teacher's targets were computed on."""
    return sorted(teacher.get("spent", {}))


def _mean_tile_bytes(layout: CacheLayout) -> float | None:
    """Mean stored bytes of a tile (the tile table's `length` column)."""
    import pyarrow.parquet as pq

    if not layout.tiles.exists():
        return None
    lengths = pq.read_table(layout.tiles, columns=["length"]).column(0).to_numpy()
    return float(lengths.mean()) if len(lengths) else None


def cache_info(root: str) -> dict:
    """Counts, teachers and sizes of a cache, as a JSON-ready dict."""
    manifest = read_manifest(root)
    layout = CacheLayout(root)
    counts = manifest.get("counts", {})
    total = dir_bytes(layout.root)
    shard_bytes = sum(s.get("bytes", 0) for s in manifest.get("shards", []))
    views = counts.get("views", 0) or 0
    teachers = {fp: {"name": t["spec"]["name"], "embed_dim": t["embed_dim"],
                     "patch_dim": t["patch_dim"], "targets": t.get("n_targets", 0),
                     "complete": t.get("complete", False),
                     "missing_slides": len(t.get("missing_slides", [])),
                     "teacher_seconds": teacher_seconds(t), "devices": teacher_devices(t)}
                for fp, t in manifest["teachers"].items()}
    return {"cache": str(layout.root), "status": manifest.get("status"),
            "schema_version": manifest["schema_version"],
            "slides_ok": counts.get("slides_ok", 0), "slides_failed": counts.get("slides_failed", 0),
            "tiles": counts.get("tiles", 0), "views": views, "teachers": teachers,
            "n_shards": manifest["n_shards"], "bytes_on_disk": total, "bytes_in_shards": shard_bytes,
            "bytes_per_view": (shard_bytes / views) if views else None,
            "bytes_per_tile": _mean_tile_bytes(layout),
            "settings": manifest["settings"], "plan": read_plan(layout.root)}




def verify_cache(root: str, recompute: int = 0, seed: int = 0, device: str = "cpu",
                 teachers: dict | None = None, checksums: bool = True,
                 tolerance: float = RECOMPUTE_TOLERANCE) -> dict:
    """Check every checksum (index values, tile bytes, target rows), that every view of a complete
    teacher has its target, and that canary views replay as the teacher saw them; optionally re-run
    the teachers on `recompute` random views (a difference beyond `tolerance` is a problem).

    `checksums=False` skips the full pass (reading the whole cache) and only recomputes.
    `teachers`: ready Teacher objects by fingerprint for the recompute (else rebuilt from their specs)."""
    reader = CacheReader(root)
    manifest = reader.manifest
    started = time.perf_counter()
    report = {"cache": str(reader.layout.root), "values_checked": 0, "problems": [],
              "target_counts": {}, "data_bytes": 0, "seconds": 0.0, "mb_per_second": 0.0,
              "recompute": None, "canaries": None}
    canaries = check_canaries(reader, seed=seed, remedy="Install the versions the cache recorded "
                              "(`g2l cache info --json`: view_versions), or rebuild the cache")
    report["canaries"] = {"checked": canaries.checked, "changed": canaries.changed}
    if not canaries.ok:
        report["problems"].append(canaries.message)
    if checksums:
        views = reader.view_index
        # Views are ordered by slide, so each slide's views are one range of the index.
        tile_of = views["tile"]
        ctx = _VerifyContext(reader, reader.tile_index["slide"][tile_of], reader.tile_index["shard"][tile_of])
        shards = [s for s in range(manifest["n_shards"]) if index_path(reader.layout.shard(s)).exists()]
        # zlib releases the GIL on large buffers: shards are checked side by side.
        with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
            for checked, nbytes, problems in pool.map(ctx.check_shard, shards):
                report["values_checked"] += checked
                report["data_bytes"] += nbytes
                report["problems"] += problems
        counts = report["target_counts"] = {fp: int(d.sum()) for fp, d in ctx.done.items()}
        for fp, info in manifest["teachers"].items():
            if counts[fp] != info.get("n_targets"):
                report["problems"].append(f"teacher {fp}: manifest says {info.get('n_targets')} targets, "
                                          f"shards hold {counts[fp]}.")
            if info.get("complete") and counts[fp] != len(views):
                report["problems"].append(f"teacher {fp}: {len(views)} views but {counts[fp]} targets.")
        report["seconds"] = time.perf_counter() - started
        report["mb_per_second"] = report["data_bytes"] / 1e6 / max(report["seconds"], 1e-9)
    if recompute > 0 and reader.n_views:
        report["recompute"] = _recompute(reader, recompute, seed, device, teachers or {}, tolerance)
        report["problems"] += [f"recompute {fp}: {r['problem']}" for fp, r in report["recompute"].items()
                               if r.get("problem")]
    return report


class _VerifyContext:
    """What the checksum pass shares between shards: the index and each teacher's committed views."""

    def __init__(self, reader: CacheReader, view_slide: np.ndarray, view_shard: np.ndarray):
        self.reader, self.view_slide, self.view_shard = reader, view_slide, view_shard
        self.slide_ids = reader.slides()["slide_id"].to_list()
        self.done = {fp: np.zeros(len(view_slide), dtype=bool) for fp in reader.manifest["teachers"]}

    def check_shard(self, shard: int) -> tuple[int, int, list[str]]:
        """(index values checked, data bytes read, problems) of one shard."""
        layout, teachers = self.reader.layout, self.reader.manifest["teachers"]
        path = layout.shard(shard)
        problems, checked = [], 0
        env = shared_env(path, lock=False)
        try:
            for key, value in iter_prefix(env, b""):
                checked += 1
                try:
                    unpack(value, key)
                except CorruptValue as exc:
                    problems.append(f"shard {shard}: {exc}")
            on_shard = self.view_shard == shard
            for slide in np.unique(self.view_slide[on_shard]):
                lo, hi = np.searchsorted(self.view_slide, [slide, slide + 1])
                for fp in teachers:
                    try:
                        bits = get_value(env, done_key(self.slide_ids[int(slide)], fp))
                    except CorruptValue:
                        continue  # reported above
                    self.done[fp][lo:hi] = bits_from_bytes(bits, int(hi - lo))
        finally:
            close_env(path)
        tiles = self.reader.tile_index
        mine = np.flatnonzero(tiles["shard"] == shard)
        nbytes, bad = _check_tiles(layout, shard, tiles[mine], mine)
        problems += bad
        for fp, info in teachers.items():
            n, bad = _check_targets(layout, shard, fp, info, self.reader.view_index,
                                    np.flatnonzero(on_shard & self.done[fp]))
            nbytes += n
            problems += bad
        return checked, nbytes, problems


def _open_sequential(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd


def _prefetch(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to read the next block while this one is checked (IO overlaps the CRCs)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def _check_tiles(layout: CacheLayout, shard: int, entries: np.ndarray, rows: np.ndarray
                 ) -> tuple[int, list[str]]:
    """CRC of every stored tile of one shard, read in file order in large blocks."""
    stored = entries["offset"] >= 0
    if not stored.any():
        return 0, []
    order = np.argsort(entries["offset"][stored], kind="stable")
    entries = entries[stored][order]
    offs, lens, crcs = (entries[f].tolist() for f in ("offset", "length", "crc"))
    rows = rows[stored][order].tolist()
    problems, total, i, n = [], 0, 0, len(offs)
    fd = _open_sequential(layout.tiles_file(shard))
    try:
        while i < n:
            base, j = offs[i], i + 1
            while j < n and offs[j] + lens[j] - base <= READ_BLOCK:
                j += 1
            _prefetch(fd, offs[j - 1] + lens[j - 1], READ_BLOCK)
            block = memoryview(os.pread(fd, offs[j - 1] + lens[j - 1] - base, base))
            total += len(block)
            for k in range(i, j):
                lo = offs[k] - base
                data = block[lo:lo + lens[k]]
                if len(data) != lens[k] or zlib.crc32(data) != crcs[k]:
                    problems.append(f"shard {shard}: checksum mismatch for tile {rows[k]}.")
            i = j
    finally:
        os.close(fd)
    return total, problems


def _check_targets(layout: CacheLayout, shard: int, fp: str, info: dict, views: np.ndarray,
                   chosen: np.ndarray) -> tuple[int, list[str]]:
    """CRC of the target row of each `chosen` view (all in one shard) of one teacher."""
    if not len(chosen):
        return 0, []
    path = layout.targets_file(shard, fp)
    if not path.exists():
        return 0, [f"shard {shard}: targets of teacher {fp} are missing ({path.name})."]
    stride = target_row_bytes(info["embed_dim"], info["patch_dim"])
    payload = stride - CRC_BYTES
    rows = views["row"][chosen].astype(np.int64)
    order = np.argsort(rows, kind="stable")
    rows, chosen = rows[order], chosen[order]
    problems, total = [], 0
    per_block = max(1, READ_BLOCK // stride)
    fd = _open_sequential(path)
    try:
        for i in range(0, len(rows), per_block):
            block_rows = rows[i:i + per_block]
            lo, hi = int(block_rows[0]), int(block_rows[-1]) + 1
            _prefetch(fd, hi * stride, READ_BLOCK)
            data = os.pread(fd, (hi - lo) * stride, lo * stride)
            total += len(data)
            have = len(data) // stride
            at = (block_rows - lo).tolist()
            stored = np.frombuffer(data, dtype=np.uint8)[:have * stride].reshape(have, stride)
            stored = stored[:, payload:].copy().view("<u4").ravel().tolist()
            block = memoryview(data)
            for j, p in enumerate(at):
                if p >= have or zlib.crc32(block[p * stride:p * stride + payload]) != stored[p]:
                    problems.append(f"shard {shard}: checksum mismatch for the target of view "
                                    f"{int(chosen[i + j])} (teacher {fp}).")
    finally:
        os.close(fd)
    return total, problems


def _recompute(reader: CacheReader, n: int, seed: int, device: str, ready: dict, tolerance: float) -> dict:
    """Re-run each complete teacher on n random cached views; the largest differences, and a problem
    when they exceed `tolerance` or the teacher cannot be rebuilt to its fingerprint."""
    import torch

    from g2l_cache.teachers import TeacherSpec, load_teacher

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(reader.n_views, size=min(n, reader.n_views), replace=False))
    x = torch.stack([reader.replay(int(v)) for v in picks])
    out = {}
    for fp, info in reader.manifest["teachers"].items():
        if not info.get("complete"):
            continue
        try:
            teacher = ready.get(fp) or load_teacher(TeacherSpec.from_record(info["spec"]),
                                                    img_size=info["input_size"], device=device)
        except G2LError as exc:
            out[fp] = {"problem": f"the teacher could not be rebuilt: {exc}"}
            continue
        if teacher.fingerprint() != fp:
            out[fp] = {"problem": f"the rebuilt teacher has fingerprint {teacher.fingerprint()}, not {fp}: its "
                       "weights, arguments, preprocessing or precision are not those of the cached targets "
                       "(a changed weights file, or a cache from an older g2l whose fingerprint covered less)."}
            continue
        result = compare_targets(reader, fp, picks, *teacher.embed(x))
        result["tolerance"] = tolerance
        if result["relative_max_diff"] > tolerance:
            result["problem"] = (f"recomputed targets differ from the stored ones by {result['relative_max_diff']:.2%} "
                                 f"of their largest magnitude (tolerance {tolerance:.0%}; min cosine "
                                 f"{result['min_cosine']:.4f}).")
        out[fp] = result
    return out


def compare_targets(reader: CacheReader, fp: str, views: np.ndarray, emb, patch) -> dict:
    """Largest differences between freshly computed and stored targets of `views` (torch tensors)."""
    import torch

    stored = [reader.target(fp, int(v)) for v in views]
    s_emb = torch.from_numpy(np.stack([s[0] for s in stored]).astype(np.float32))
    s_patch = torch.from_numpy(np.stack([s[1] for s in stored]).astype(np.float32))
    emb, patch = emb.float().cpu(), patch.float().cpu()
    cos = torch.nn.functional.cosine_similarity(emb, s_emb, dim=1)
    max_diff = max(float((emb - s_emb).abs().max()), float((patch - s_patch).abs().max()))
    scale = max(float(s_emb.abs().max()), float(s_patch.abs().max()), 1e-12)
    return {"views": len(views), "max_abs_diff_embedding": float((emb - s_emb).abs().max()),
            "max_abs_diff_patch": float((patch - s_patch).abs().max()),
            "relative_max_diff": max_diff / scale, "min_cosine": float(cos.min())}
