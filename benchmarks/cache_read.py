"""(4) Cache read rate: random reads of (tile bytes + target) per second in one process, the rate
of full training items (read + decode + replay the view), and how many DataLoader workers it takes
to feed the student step measured by student_fit.py (read from results/student_fit.json).
"""

import json
import math
import random
import time
from pathlib import Path

from _common import bench_cache, device_name, parser, save


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--reads", type=int, default=3000)
    args = p.parse_args()
    from g2l_cache import CacheReader
    from g2l_student.data import CachedViews

    cache = bench_cache(args)
    reader = CacheReader(str(cache))
    fp = reader.teacher(args.teacher)["fingerprint"]
    rng = random.Random(0)
    order = [rng.randrange(reader.n_views) for _ in range(args.reads)]
    t = time.perf_counter()
    for i in order:
        reader.tile_bytes(int(reader.view_index[i]["tile"]))
        reader.target(fp, i)
    raw_rate = args.reads / (time.perf_counter() - t)
    items = CachedViews(reader, fp)
    n_items = min(args.reads, 1000)
    t = time.perf_counter()
    for i in order[:n_items]:
        items[i]
    item_rate = n_items / (time.perf_counter() - t)
    fit_json = Path(args.out) / "student_fit.json"
    needed = None
    if fit_json.exists():
        fit = json.loads(fit_json.read_text())
        needed = math.ceil(fit["bare_steps_per_s"] * fit["batch_size"] / item_rate)
    save("cache_read", {
        "device": device_name("cpu"), "reads": args.reads,
        "raw_reads_per_s": raw_rate, "items_per_s_per_process": item_rate,
        "tile_px": reader.policy.tile_size, "view_px": reader.policy.crop_size,
        "workers_to_feed_bare_student_step": needed,
    }, args.out)


if __name__ == "__main__":
    main()
