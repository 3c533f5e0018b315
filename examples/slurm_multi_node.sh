#!/usr/bin/env bash
# Stage one and stage two on several nodes with Slurm + torchrun (8 GPUs per node).
#   sbatch --nodes 4 examples/slurm_multi_node.sh
# Every rank writes its own shards into ONE cache folder, so CACHE must be on storage all nodes see
# and that supports file locks (Lustre, GPFS, BeeGFS, NFSv4 with locking). Without locks, build on one node's local disk and copy the finished
# cache to shared storage: readers (student fits) need no locks at all. See docs/recipes.md.
#SBATCH --job-name=g2l
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
set -euo pipefail
SLIDES=${SLIDES:-/data/tcga-brca/slides}
CACHE=${CACHE:-/shared/g2l/brca-hopt0}
RUN=${RUN:-/shared/g2l/runs/brca-vitl}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
launch() {
    srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_id "$SLURM_JOB_ID" --rdzv_endpoint "$HEAD:$PORT" "$@"
}
# 1. Teacher pass: the nodes x 8 ranks share the cache's shards (1,024 by default) by their planned
#    views, so every rank finishes together. Workers default to the node's cores / 8 ranks. Slides
#    on network storage are copied to each node's local disk two ahead of the reading (--stage-dir).
#    Re-submit the same job after a preemption: committed batches are kept.
launch "$(command -v g2l)" cache build "$SLIDES" --recursive --out "$CACHE" \
    --config examples/h-optimus-0-brca.toml --stage-dir "${TMPDIR:-/tmp}/g2l-slides"
# 2. Check a sample against the teacher (one process).
srun --nodes 1 --ntasks 1 g2l cache verify "$CACHE" --recompute 64 --checksums
# 3. The student: all ranks read the finished cache without locks (read-only mounts work).
#    --auto-resume starts the run on the first submission and resumes it from its last checkpoint on
#    every requeue (before the first checkpoint it starts over, as a new run would).
launch -m cli student fit "$CACHE" --out "$RUN" --config examples/g2l-student.toml --auto-resume
