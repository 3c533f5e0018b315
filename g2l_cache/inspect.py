"""`g2l cache info` and `g2l cache verify`: what a cache holds, and whether it is intact."""

from __future__ import annotations

import random

import numpy as np
import torch

from g2l_cache.layout import CacheLayout, dir_bytes, read_manifest
from g2l_cache.reader import CacheReader
from g2l_cache.store import CorruptValue, iter_prefix, shared_env, unpack


def cache_info(root: str) -> dict:
    """Counts, teachers and sizes of a cache, as a JSON-ready dict."""
    manifest = read_manifest(root)
    layout = CacheLayout(root)
    counts = manifest.get("counts", {})
    total = dir_bytes(layout.root)
    shard_bytes = sum(dir_bytes(layout.shard(s)) for s in range(manifest["n_shards"])
                      if layout.shard(s).exists())
    views = counts.get("views", 0) or 0
    teachers = {fp: {"name": t["spec"]["name"], "embed_dim": t["embed_dim"],
                     "patch_dim": t["patch_dim"], "targets": t.get("n_targets", 0),
                     "complete": t.get("complete", False)}
                for fp, t in manifest["teachers"].items()}
    return {"cache": str(layout.root), "status": manifest.get("status"),
            "schema_version": manifest["schema_version"],
            "slides_ok": counts.get("slides_ok", 0), "slides_failed": counts.get("slides_failed", 0),
            "tiles": counts.get("tiles", 0), "views": views, "teachers": teachers,
            "n_shards": manifest["n_shards"], "bytes_on_disk": total, "bytes_in_shards": shard_bytes,
            "bytes_per_view": (shard_bytes / views) if views else None,
            "settings": manifest["settings"]}


def verify_cache(root: str, recompute: int = 0, seed: int = 0, device: str = "cpu") -> dict:
    """Check every checksum and that each tile and view has its values; optionally re-run the teacher."""
    reader = CacheReader(root)
    layout = reader.layout
    tiles, views = reader.tiles(), reader.views()
    problems: list[str] = []
    checked = 0
    teachers = reader.manifest["teachers"]
    target_counts = {fp: 0 for fp in teachers}
    tile_present: set[str] = set()
    for shard in range(reader.manifest["n_shards"]):
        path = layout.shard(shard)
        if not path.exists():
            continue
        for key, value in iter_prefix(shared_env(path), b""):
            checked += 1
            try:
                unpack(value, key)
            except CorruptValue as exc:
                problems.append(f"shard {shard}: {exc}")
            kind, _, rest = bytes(key).partition(b"/")
            if kind == b"tile":
                tile_present.add(rest.decode())
            elif kind == b"tgt":
                fp = rest.split(b"/", 1)[0].decode()
                if fp in target_counts:
                    target_counts[fp] += 1
    missing_tiles = set(tiles["tile_id"].to_list()) - tile_present
    if missing_tiles:
        problems.append(f"{len(missing_tiles)} tiles in tiles.parquet have no stored pixels "
                        f"(e.g. {sorted(missing_tiles)[0]}).")
    for fp, info in teachers.items():
        if target_counts[fp] != info.get("n_targets"):
            problems.append(f"teacher {fp}: manifest says {info.get('n_targets')} targets, "
                            f"shards hold {target_counts[fp]}.")
        if info.get("complete") and target_counts[fp] != views.height:
            problems.append(f"teacher {fp}: {views.height} views but {target_counts[fp]} targets.")
    report = {"cache": str(layout.root), "values_checked": checked, "problems": problems,
              "target_counts": target_counts, "recompute": None}
    if recompute > 0 and views.height:
        report["recompute"] = _recompute(reader, views, recompute, seed, device)
    return report


def _recompute(reader: CacheReader, views, n: int, seed: int, device: str) -> dict:
    """Re-run each complete teacher on n random cached views; report the largest differences."""
    from g2l_cache.teachers import TeacherSpec, load_teacher

    rows = views.to_dicts()
    picks = random.Random(seed).sample(rows, min(n, len(rows)))
    x = torch.stack([reader.replay(r) for r in picks])
    out = {}
    for fp, info in reader.manifest["teachers"].items():
        if not info.get("complete"):
            continue
        teacher = load_teacher(TeacherSpec(**info["spec"]), img_size=info["input_size"], device=device)
        if teacher.fingerprint() != fp:
            out[fp] = {"error": "rebuilt teacher has another fingerprint (weights changed?)"}
            continue
        emb, patch = teacher.embed(x)
        stored = [reader.target(fp, r["view_id"], r["shard"]) for r in picks]
        s_emb = torch.from_numpy(np.stack([s[0] for s in stored]).astype(np.float32))
        s_patch = torch.from_numpy(np.stack([s[1] for s in stored]).astype(np.float32))
        emb, patch = emb.cpu(), patch.cpu()
        cos = torch.nn.functional.cosine_similarity(emb, s_emb, dim=1)
        out[fp] = {"views": len(picks), "max_abs_diff_embedding": float((emb - s_emb).abs().max()),
                   "max_abs_diff_patch": float((patch - s_patch).abs().max()),
                   "min_cosine": float(cos.min())}
    return out
