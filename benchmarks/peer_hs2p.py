"""hs2p's tiling of one slide, as a whole command: run by `real_slide.py --peer` with the python of a
scratch venv that has hs2p (never g2l's own). Prints one JSON line: seconds, tiles.

The same job as `g2l cache plan`: Otsu tissue segmentation, 224-px tiles at 0.5 um/px, a tile kept
when tissue covers at least half of it (g2l's default --tissue-threshold; hs2p's own default keeps a
tile at 1 %), 2 workers.
"""

import json
import sys
import time
from pathlib import Path

started = time.time()
import hs2p  # noqa: E402  (imports are part of the command's time)
from dataclasses import replace  # noqa: E402

from hs2p import SegmentationConfig, SlideSpec, TilingConfig, tile_slide  # noqa: E402
from hs2p.configs.models import DEFAULT_MASK_SAMPLING  # noqa: E402

slide = Path(sys.argv[1])
result = tile_slide(SlideSpec(sample_id=slide.stem, image_path=slide),
                    tiling=TilingConfig(requested_spacing_um=0.5, requested_tile_size_px=224, tolerance=0.05,
                                        overlap=0.0),
                    segmentation=SegmentationConfig(method="otsu"),
                    masks=replace(DEFAULT_MASK_SAMPLING, min_coverage={"tissue": 0.5}), num_workers=2)
tiles = len(result.tiles.x) if hasattr(result.tiles, "x") else len(result.tiles)
print(json.dumps({"seconds": time.time() - started, "tiles": tiles, "version": hs2p.__version__}))
