"""(5) Storage: bytes on disk per view for targets and per tile for pixels, against the raw sizes
(embedding + mean patch dims x 2 bytes per fp16 target; the encoded tile bytes).
"""

from _common import bench_cache, parser, save


def main() -> None:
    args = parser(__doc__).parse_args()
    from g2l_cache import CacheReader

    cache = bench_cache(args)
    reader = CacheReader(str(cache))
    info = reader.teacher(args.teacher)
    views, tiles = reader.n_views, len(reader.tile_index)
    shards = reader.layout.shards_dir
    target_disk = sum(p.stat().st_blocks * 512 for p in shards.glob(f"*/targets/{info['fingerprint']}.bin"))
    tile_disk = sum(p.stat().st_blocks * 512 for p in shards.glob("*/tiles.bin"))
    encoded = int(reader.tile_index["length"].sum())
    index_disk = sum(f.stat().st_size for f in shards.glob("*/index.lmdb/data.mdb"))
    raw_target = (info["embed_dim"] + info["patch_dim"]) * 2
    tile = reader.policy.tile_size
    save("storage", {
        "ratio": target_disk / (views * raw_target), "teacher": args.teacher, "views": views,
        "tiles": tiles, "target_bytes_per_view": target_disk / views, "raw_target_bytes": raw_target,
        "tile_bytes_per_tile": tile_disk / tiles, "tile_disk_ratio": tile_disk / encoded,
        "raw_tile_bytes": tile * tile * 3, "tile_compression": tile * tile * 3 / (encoded / tiles),
        "shard_index_bytes_per_view": index_disk / views,
    }, args.out)


if __name__ == "__main__":
    main()
