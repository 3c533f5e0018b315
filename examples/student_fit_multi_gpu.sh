#!/usr/bin/env bash
# Stage two on one node with 8 GPUs, bf16. The config's batch_size (256) is the global batch:
# 32 per GPU here (the paper ran a global 32 on 3 GPUs). The fit prints the batch per process and
# the share of the cached views the run reads before its first step.
# Multi-node: `accelerate launch --num_machines N --machine_rank R --main_process_ip ... -m cli ...`.
set -euo pipefail
CACHE=${CACHE:-/data/g2l/brca-hopt0}
RUN=${RUN:-runs/brca-vitl-g2l}
accelerate launch --num_processes 8 --mixed_precision bf16 -m cli student fit "$CACHE" \
    --out "$RUN" --config examples/g2l-student.toml
g2l student report "$RUN"
