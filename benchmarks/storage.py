"""(5) Storage: bytes per view for targets and per tile for pixels, against the raw sizes
(embedding + mean patch dims x 2 bytes per fp16 target; tile px^2 x 3 bytes of RGB).
"""

from collections import defaultdict

from _common import bench_cache, parser, save


def main() -> None:
    args = parser(__doc__).parse_args()
    from g2l_cache import CacheReader
    from g2l_cache.store import iter_prefix, shared_env

    cache = bench_cache(args)
    reader = CacheReader(str(cache))
    info = reader.teacher(args.teacher)
    sizes, counts = defaultdict(int), defaultdict(int)
    key_bytes = 0
    for shard in range(reader.manifest["n_shards"]):
        for key, value in iter_prefix(shared_env(reader.layout.shard(shard)), b""):
            kind = bytes(key).split(b"/")[0].decode()
            sizes[kind] += len(value)
            counts[kind] += 1
            key_bytes += len(key)
    disk = sum(f.stat().st_size for f in reader.layout.shards_dir.rglob("*.mdb"))
    raw_target = (info["embed_dim"] + info["patch_dim"]) * 2
    tile = reader.policy.tile_size
    per_view = sizes["tgt"] / counts["tgt"]
    per_tile = sizes["tile"] / counts["tile"]
    save("storage", {
        "ratio": per_view / raw_target, "teacher": args.teacher, "views": counts["tgt"],
        "tiles": counts["tile"], "target_bytes_per_view": per_view, "raw_target_bytes": raw_target,
        "tile_bytes_per_tile": per_tile, "raw_tile_bytes": tile * tile * 3,
        "tile_compression": tile * tile * 3 / per_tile,
        "lmdb_file_bytes_per_view": disk / counts["tgt"],
        "overhead_of_lmdb_file": disk / (sum(sizes.values()) + key_bytes),
    }, args.out)


if __name__ == "__main__":
    main()
