#!/usr/bin/env bash
# Stage one on one node with 4 GPUs (the processes share the cache's shards by their planned views).
# For several nodes, run the same command on each node with --nnodes/--node_rank/--rdzv_endpoint.
set -euo pipefail
SLIDES=${SLIDES:-/data/tcga-brca/slides}
CACHE=${CACHE:-/data/g2l/brca-hopt0}
torchrun --nproc_per_node 4 "$(command -v g2l)" cache build "$SLIDES" --recursive \
    --out "$CACHE" --config examples/h-optimus-0-brca.toml
g2l cache verify "$CACHE" --recompute 64 --checksums
g2l cache info "$CACHE"
