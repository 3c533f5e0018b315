#!/usr/bin/env bash
# Stage two on one node with 3 GPUs (the paper's set-up: global batch 32, bf16).
# Multi-node: `accelerate launch --num_machines N --machine_rank R --main_process_ip ... -m cli ...`.
set -euo pipefail
CACHE=${CACHE:-/data/g2l/brca-hopt0}
RUN=${RUN:-runs/brca-vitl-g2l}
accelerate launch --num_processes 3 --mixed_precision bf16 -m cli student fit "$CACHE" \
    --out "$RUN" --config examples/g2l-student.toml
g2l student report "$RUN"
