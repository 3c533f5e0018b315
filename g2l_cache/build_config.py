"""BuildConfig: every option of `g2l cache build` (and the tiling/view settings `g2l cache plan` shares),
and how a config is made from a TOML file and command-line options. No torch: the plan imports it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from g2l_cache.errors import G2LError
from g2l_cache.layout import CacheLayout, read_manifest
from g2l_cache.options import option
from g2l_cache.presets import DEFAULT_PRECISION, PRECISIONS, PRESET_NAMES, TeacherSpec
from g2l_cache.slides import worker_count_hint
from g2l_cache.tile_codec import TILE_FORMATS
from g2l_cache.tiling import TilingConfig
from g2l_cache.views import ViewPolicy

# Fixed at creation. Ranks share shards out by their work (largest first onto the least-loaded), so
# many small shards let 64 ranks finish within 1 % of each other (benchmarks/balance.py); a shard no
# slide maps to is never created.
DEFAULT_SHARDS = 1024


@dataclass
class BuildConfig:
    """Every option of `g2l cache build`: its default, help and group are written here only."""

    # Options that exclude each other: one given on the command line clears the others from a config file.
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("teacher_weights", "random_init"),)

    out: str = option(help="Cache folder (created, resumed, or extended).", group="input and output", short="-o",
                      help_in={"plan": "Cache folder to plan into: tissue detection and tile choice are stored "
                               "there with plan.json, and a later `g2l cache build` with the same --out starts "
                               "from them."})
    teacher: str = option(help=f"Teacher preset ({', '.join(PRESET_NAMES)}) or any timm model name.",
                          group="teacher", help_in={"plan": f"Teacher preset ({', '.join(PRESET_NAMES)}) or any "
                                                    "timm model name, whose FLOPs and target size are costed "
                                                    "(no weights are loaded)."})
    slides: list[str] = option(default_factory=list, kind="arguments", group="input and output",
                               help="Slide files, folders of slides, or a CSV with a 'path' column (optional "
                               "'slide_id', 'mpp'). May be omitted when resuming or adding a teacher.",
                               help_in={"plan": "Slide files, folders of slides, or a CSV with a 'path' column "
                                        "(optional 'slide_id', 'mpp'). May be omitted to re-plan the slides "
                                        "the cache knows."})
    recursive: bool = option(False, group="input and output", help="Search slide folders recursively.")
    teacher_weights: str | None = option(None, group="teacher", commands=("build",),
                                         help="Local weights (.safetensors) instead of the hub.")
    random_init: bool = option(False, group="teacher", commands=("build",),
                               help="Random teacher weights (tests, demo).")
    precision: str = option(DEFAULT_PRECISION, group="teacher", commands=("build",),
                            help=f"Compute precision of the teacher: {', '.join(PRECISIONS)} (autocast; part of "
                            "the teacher's fingerprint, so targets of two precisions never mix). auto: fp16 on a "
                            "GPU (as fast as bf16 there, 8x closer to fp32), fp32 on a CPU (where fp16 is emulated).")
    mpp: float = option(0.5, group="tiling", help="Microns per pixel the tiles are read at.")
    mpp_override: float | None = option(None, group="tiling",
                                        help="Level-0 mpp to use for every slide, whatever its metadata "
                                        "says (a CSV 'mpp' column still wins for its slide).")
    tile_size: int = option(256, group="tiling", help="Tile side in px at --mpp.")
    max_tiles_per_slide: int | None = option(None, group="tiling",
                                             help="Keep a seeded random subset of this many tiles per slide.")
    tissue_threshold: float = option(0.5, group="tiling", help="Minimum tissue fraction of a kept tile.")
    tissue_method: str = option("otsu", group="tiling", help="Tissue mask: otsu or morphological.")
    annotations: str | None = option(None, group="tiling",
                                     help="Folder of QuPath GeoJSON annotations, one per slide (SLIDE_ID.geojson): "
                                     "tiles are kept where annotated tissue covers the tissue threshold; slides "
                                     "without a file are tiled whole. Fixed when the cache is created.")
    annotation_classes: str | None = option(None, group="tiling",
                                            help="With --annotations: comma-separated classes whose regions count "
                                            "(e.g. Tumor,Stroma; default every region).")
    crop_size: int = option(224, group="views", help="View crop side in px = the teacher's input size.")
    views: int = option(4, group="views", help="Augmented views (K) per tile.")
    seed: int = option(0, group="views", help="Seed of tile subsets, views and random init.")
    tile_format: str = option("jpeg", group="encoding", help="Stored tile encoding: jpeg, or png (lossless).")
    jpeg_quality: int = option(95, group="encoding", help="JPEG quality of stored tiles.")
    shards: int = option(DEFAULT_SHARDS, group="encoding",
                         help="Shards of a new cache: the processes of a build share them out by their "
                         "planned views, so many shards balance many processes (up to this many share a build).")
    batch_size: int = option(32, group="runtime", commands=("build",), help="Views per teacher batch.")
    num_workers: int = option(default_factory=worker_count_hint, group="runtime",
                              default_text="cores per process - 1, at most 8",
                              help="DataLoader workers reading, encoding and augmenting tiles.",
                              help_in={"plan": "Worker processes detecting tissue, one slide each."})
    strict: bool = option(False, group="runtime", commands=("build",), help="Exit non-zero if any slide failed.")
    stage_dir: str | None = option(None, group="runtime", commands=("build",),
                                   help="Local folder to copy slides into, a few ahead of the teacher pass, when "
                                   "they live on slow shared storage; each copy is deleted once read (the cache "
                                   "records the original paths).")
    stage_ahead: int = option(2, group="runtime", commands=("build",),
                              help="With --stage-dir: slides copied ahead of the one being read (local disk "
                              "needed: this many of your largest slides).")
    accept_changed_views: bool = option(False, group="runtime", commands=("build",),
                                        help="Go on when stored tiles now decode into other views than the "
                                        "teacher saw (a Pillow / libjpeg / numpy upgrade); refused by default.")
    replan_changed: bool = option(False, group="runtime",
                                  help="Re-tile the slides whose mpp override, annotation or file content "
                                  "changed since they were cached, discarding their stored tiles and every "
                                  "teacher's targets of them (refused without this option, listing them).")
    cpu: bool = option(False, group="runtime", commands=("build",), help="Run on CPU even if a GPU is present.")
    progress: bool = option(True, group="runtime", help="Progress bars (--no-progress for logs and CI).")

    def __post_init__(self) -> None:
        if self.views < 1:
            raise G2LError(f"--views must be at least 1, got {self.views}.")
        if self.batch_size < 1:
            raise G2LError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.num_workers < 0:
            raise G2LError("--num-workers cannot be negative.")
        if self.tile_format not in TILE_FORMATS:
            raise G2LError(f"--tile-format must be one of {', '.join(TILE_FORMATS)}.")
        if not 1 <= self.jpeg_quality <= 100:
            raise G2LError("--jpeg-quality must be in 1..100.")
        if self.shards < 1:
            raise G2LError("--shards must be at least 1.")
        if self.annotation_classes and not self.annotations:
            raise G2LError("--annotation-classes needs --annotations DIR.")
        if self.annotations and not Path(self.annotations).is_dir():
            raise G2LError(f"--annotations {self.annotations} is not a folder; pass the folder holding one "
                           "GeoJSON per slide (SLIDE_ID.geojson).")
        if self.stage_ahead < 1:
            raise G2LError(f"--stage-ahead must be at least 1, got {self.stage_ahead}.")

    def tiling(self) -> TilingConfig:
        return TilingConfig(mpp=self.mpp, tile_size=self.tile_size,
                            tissue_threshold=self.tissue_threshold,
                            tissue_method=self.tissue_method,
                            max_tiles_per_slide=self.max_tiles_per_slide,
                            annotations=bool(self.annotations), annotation_classes=self.class_names())

    def class_names(self) -> tuple[str, ...]:
        """--annotation-classes as a tuple (empty: every region counts)."""
        return tuple(c.strip() for c in (self.annotation_classes or "").split(",") if c.strip())

    def policy(self) -> ViewPolicy:
        return ViewPolicy(tile_size=self.tile_size, crop_size=self.crop_size)

    def settings(self) -> dict:
        """What fixes the cache's keys and pixels: a resume must match it exactly."""
        return {"tiling": self.tiling().to_dict(),
                "views": {"per_tile": self.views, "policy": self.policy().to_dict()},
                "seed": self.seed,
                "tile_encoding": {"format": self.tile_format,
                                  "quality": self.jpeg_quality if self.tile_format == "jpeg" else None}}

    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec(self.teacher, self.teacher_weights, self.random_init, self.seed, self.precision)


def existing_cache_options(out: str | Path) -> dict:
    """The tiling/view options an existing cache was built with ({} if `out` is no cache yet).

    Options a user leaves out when resuming or adding a teacher default to these, so the
    settings match without repeating them.
    """
    if not CacheLayout(out).manifest.exists():
        return {}
    s = read_manifest(out)["settings"]
    t, v, e = s["tiling"], s["views"], s["tile_encoding"]
    values = {"mpp": t["mpp"], "tile_size": t["tile_size"], "tissue_threshold": t["tissue_threshold"],
              "tissue_method": t["tissue_method"], "max_tiles_per_slide": t["max_tiles_per_slide"],
              "crop_size": v["policy"]["crop_size"], "views": v["per_tile"], "seed": s["seed"],
              "tile_format": e["format"]}
    if e.get("quality") is not None:
        values["jpeg_quality"] = e["quality"]
    if t.get("annotations"):  # the folder recorded when the cache was planned
        values["annotations"] = read_manifest(out).get("annotations", {}).get("folder")
        values["annotation_classes"] = ",".join(t.get("annotation_classes", [])) or None
    return values


def config_from_dict(values: dict, cls: type = BuildConfig) -> BuildConfig:
    """A BuildConfig (or `cls`, e.g. PlanConfig) from a plain mapping (TOML file + CLI options);
    unknown keys are an error.

    Options left out take the existing cache's tiling/view settings when `out` is a cache, so
    resuming or adding a teacher needs neither the slides nor those options again."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        command = "plan" if cls is not BuildConfig else "build"
        raise G2LError(f"unknown {command} option(s) {', '.join(unknown)}; see `g2l cache {command} --help`.")
    for required in ("out", "teacher"):
        if not values.get(required):
            raise G2LError(f"--{required} is required (on the command line or in --config).")
    return cls(**{**existing_cache_options(values["out"]), **values})
