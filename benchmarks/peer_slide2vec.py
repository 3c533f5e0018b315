"""slide2vec's tile embedding of one slide, as a whole command: run with the python of a scratch venv
that has slide2vec (never g2l's own), argument the slide, `--tiles N` (default 2000). Prints one JSON
line, the last of stdout (cuCIM, under `--backend auto`, prints lines of its own): seconds (the whole
run, imports included), embed_seconds (slide2vec's `Model.embed_tiles` alone: model construction,
reading and decoding the tiles, normalising, the forward passes, writing its .pt artifact),
tiling_seconds, candidates (tiles the tiling found), tiles, dim (both read back from the artifact),
backend, version.

The same job as `g2l cache build --teacher vit_tiny_patch16_224 --random-init --tile-size 224
--crop-size 224 --mpp 0.5 --views 1 --max-tiles-per-slide 2000 --batch-size 32 --num-workers 2`:
- the model: timm's `vit_tiny_patch16_224` with random weights (`pretrained=False`, `num_classes=0`,
  192-d CLS output), registered with slide2vec as a tile encoder here, nothing from a hub; fp32 on
  the CPU, 224-px input, slide2vec's photometrics-only transform (the model's own mean/std, 0.5 as
  g2l's, no resize), no augmentation (g2l makes an augmented view of each tile and stores the tile);
- the tiles: hs2p (slide2vec's own tiler) grids the whole slide into 224-px tiles at 0.5 um/px with
  Otsu tissue segmentation, a tile kept when tissue covers at least half of it (g2l's default
  --tissue-threshold; hs2p's and slide2vec's default is 0.01), read with OpenSlide as g2l reads
  (`--backend auto` lets hs2p pick, cuCIM first). slide2vec cannot cap a slide's tiles, so a seeded
  random N of them (as g2l's --max-tiles-per-slide picks) is handed to `Model.embed_tiles` as a
  tiling result: the whole slide's tiling is in `seconds`, the embedding of N tiles in both;
- 2 DataLoader workers, 2 tiling workers, batch size 32.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

started = time.time()
import numpy as np  # noqa: E402  (imports are part of the command's time)
import slide2vec  # noqa: E402
from hs2p import SegmentationConfig, SlideSpec, TilingConfig, tile_slide  # noqa: E402
from hs2p.configs.models import DEFAULT_MASK_SAMPLING  # noqa: E402
from slide2vec import (ExecutionOptions, Model, PreprocessingConfig, TimmTileEncoder,  # noqa: E402
                       register_encoder)

ENCODER = "g2l-bench-vit-tiny-random"


@register_encoder(ENCODER, encode_dim=192, input_size=224, supports_variable_input_size=False,
                  patch_size=16, supported_spacing_um=0.5, precision="fp32",
                  source="timm:vit_tiny_patch16_224 (random init)")
class RandomVitTiny(TimmTileEncoder):
    def __init__(self, *, output_variant=None):
        super().__init__("vit_tiny_patch16_224", output_variant=output_variant, pretrained=False)


parser = argparse.ArgumentParser()
parser.add_argument("slide", type=Path)
parser.add_argument("--tiles", type=int, default=2000)
parser.add_argument("--backend", default="openslide")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
slide = args.slide.resolve()

tiling = TilingConfig(requested_spacing_um=0.5, requested_tile_size_px=224, tolerance=0.05, overlap=0.0,
                      backend=args.backend)
segmentation = SegmentationConfig(method="otsu")
masks = replace(DEFAULT_MASK_SAMPLING, min_coverage={"tissue": 0.5})
tiling_started = time.time()
result = tile_slide(SlideSpec(sample_id=slide.stem, image_path=slide), tiling=tiling,
                    segmentation=segmentation, masks=masks, num_workers=2)
candidates = result.num_tiles
if candidates > args.tiles:
    keep = np.sort(np.random.default_rng(args.seed).choice(candidates, args.tiles, replace=False))
    geometry = result.tiles
    result = replace(result, tiles=replace(geometry, x=geometry.x[keep], y=geometry.y[keep],
                                           tissue_fractions=geometry.tissue_fractions[keep], tile_index=None))
tiling_seconds = time.time() - tiling_started

model = Model.from_preset(ENCODER, device="cpu")
preprocessing = PreprocessingConfig(tiling=replace(tiling, backend=result.backend), segmentation=segmentation,
                                    masks=masks, on_the_fly=True)
with tempfile.TemporaryDirectory(prefix="peer-slide2vec-") as out:
    execution = ExecutionOptions(output_dir=Path(out), batch_size=32, num_workers_per_gpu=2,
                                 num_preprocessing_workers=2, num_gpus=1, precision="fp32")
    embed_started = time.time()
    artifacts = model.embed_tiles([{"sample_id": slide.stem, "image_path": slide}], [result],
                                  preprocessing=preprocessing, execution=execution)
    embed_seconds = time.time() - embed_started
    import torch

    features = torch.load(artifacts[0].path, map_location="cpu")  # the (tiles, dim) tensor it wrote
    features = features["features"] if isinstance(features, dict) else features
    assert torch.isfinite(features).all()
    tiles, dim = int(features.shape[0]), int(features.shape[1])
print(json.dumps({"seconds": time.time() - started, "embed_seconds": embed_seconds,
                  "tiling_seconds": tiling_seconds, "candidates": int(candidates), "tiles": tiles, "dim": dim,
                  "backend": result.backend, "version": slide2vec.__version__}))
sys.stdout.flush()
