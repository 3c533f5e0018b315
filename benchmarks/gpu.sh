#!/usr/bin/env bash
# GPU benchmark, one H100 (< 8 min): real architectures with random weights, bf16.
#   teacher h-optimus-0 (ViT-g/14 + 4 registers, 1.1 B), student ViT-L/14 (reg4, DINOv2 layout).
# Prints (1) cache-build efficiency, (2) student-fit efficiency, (3) cached vs online, and the
# teacher's achieved TFLOP/s against the card's dense bf16 peak.
#
# Usage: benchmarks/gpu.sh CACHE [RESULTS_DIR]
#   CACHE: a cache with stored tiles (256 px, 224 px views), e.g. from
#     python benchmarks/make_gpu_cache.py benchmarks/work/gpu-cache
#   The build then adds the H-optimus-0 targets from the stored tiles, so this script needs no
#   slide reader (tiatoolbox) on the GPU machine; pass slides instead to measure slide reading too.
set -euo pipefail
CACHE=$(realpath -m "${1:?usage: benchmarks/gpu.sh CACHE [RESULTS_DIR]}")  # before the cd below
OUT=$(realpath -m "${2:-benchmarks/results-gpu}")
PY=${PYTHON:-python3}
WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
cd "$(dirname "$0")"
COMMON=(--device cuda --tile-size 256 --crop-size 224 --workers "$WORKERS" --cache "$CACHE" --out "$OUT")
echo "== device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader) workers=$WORKERS"
$PY cache_build.py --teacher h-optimus-0 --batch-size 64 "${COMMON[@]}"
$PY student_fit.py --teacher h-optimus-0 --student vit_large_patch14_reg4_dinov2 --batch-size 32 --steps 120 "${COMMON[@]}"
$PY cached_vs_online.py --teacher h-optimus-0 --student vit_large_patch14_reg4_dinov2 --batch-size 32 --steps 40 "${COMMON[@]}"
$PY teacher_flops.py --teacher h-optimus-0 --results "$OUT" --peak-tflops 989
