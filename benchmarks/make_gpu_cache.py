"""Build the small cache benchmarks/gpu.sh carries to a GPU machine: stored 256 px tiles (224 px
views) from the demo slides, with a tiny placeholder teacher; many views per tile keep the file
small enough to travel (the GPU machine has no slide reader and no network).

Usage: python benchmarks/make_gpu_cache.py OUT [--slides 6] [--tiles-per-slide 20] [--views 32]
"""

import argparse

from _common import demo_slides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--slides", type=int, default=6)
    p.add_argument("--tiles-per-slide", type=int, default=20)
    p.add_argument("--views", type=int, default=32)
    args = p.parse_args()
    from g2l_cache.build import BuildConfig, run_build
    from g2l_cache.inspect import cache_info

    run_build(BuildConfig(out=args.out, teacher="test_vit", random_init=True,
                          slides=[str(demo_slides(args.slides))], views=args.views,
                          max_tiles_per_slide=args.tiles_per_slide, num_workers=1, progress=False))
    info = cache_info(args.out)
    print(f"{args.out}: {info['tiles']} tiles, {info['views']} views, {info['bytes_on_disk'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
