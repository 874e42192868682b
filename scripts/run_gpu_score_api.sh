#!/bin/bash
# Bulk-scoring and API benchmarks on the GPU machine, run from the repo root (see docs/benchmarks.md).
# Needs python3 with torch (CUDA), numpy, pyarrow, and keras + fastapi/uvicorn/pydantic/python-multipart/httptools/
# faiss-cpu on PYTHONPATH (carried as wheels: see the device notes in docs/benchmarks.md).
# Usage: scripts/run_gpu_score_api.sh [OUTDIR]
set -u
OUTDIR=${1:-${OUT:-/tmp/out}}
mkdir -p "$OUTDIR"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/.whl/site:$PWD PYTHONUNBUFFERED=1 KERAS_BACKEND=torch
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for rows in 50k 250k; do
    timeout 240 python3 scripts/bench_score.py --device cuda --rows 20M --shard-rows $rows \
        --engines torch:fp16,torch:bf16,null --train fit --workdir /tmp/bench-score-$rows \
        --out "$OUTDIR/bench_score_gpu_$rows.json" 2>&1 | grep -v -i warning | tail -8
    rm -rf /tmp/bench-score-$rows
done
timeout 300 python3 scripts/bench_api.py --vectors 1M --kind flat --seconds 15 --device cuda --search exact \
    --out "$OUTDIR/bench_api_gpu.json" 2>&1 | grep -v -i warning | tail -12
