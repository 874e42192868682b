#!/bin/bash
# GPU indexing benchmark, run from the repo root on the GPU machine (see docs/benchmarks.md, "GPU indexing").
# Needs python3 with torch + torchvision (CUDA), pillow, pyarrow, numpy, click, tqdm, scikit-image, and the
# pure-Python packages carried in .whl/site (clip-anytorch, ftfy, wcwidth, clip-retrieval 2.45.0, all_clip,
# fire, termcolor, braceexpand, webdataset; copied from the CPU benchmark's clip-retrieval venv).
# Usage: [TESTS=0] [STAGES=0] [VARIANTS="'' '--gpu-tower=reference' ..."] scripts/run_gpu_bench.sh THUMBS PHOTOS [OUTDIR]
# (VARIANTS: one pnsfw run per corpus for each quoted set of extra `pnsfw index` options; '' = the defaults)
set -u
THUMBS=${1:-100000}; PHOTOS=${2:-10000}; OUTDIR=${3:-${OUT:-/tmp/out}}
mkdir -p "$OUTDIR" /tmp/crbin /tmp/bin
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/.whl/site:$PWD PYTHONUNBUFFERED=1 PNSFW_TRACE=1
# a wrapper, not a symlink: a symlinked venv interpreter outside its venv loses the venv's packages
PY=$(python3 -c 'import sys; print(sys.executable)')
printf '#!/bin/sh\nexec %s "$@"\n' "$PY" > /tmp/crbin/python && chmod +x /tmp/crbin/python
printf '#!/bin/sh\nexec %s -c "import sys; from pnsfw.cli import main; sys.argv[0] = \\"pnsfw\\"; main()" "$@"\n' \
    "$PY" > /tmp/bin/pnsfw && chmod +x /tmp/bin/pnsfw
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc; python3 -c "import torch, torchvision, numpy; print(torch.__version__, torchvision.__version__, numpy.__version__)"
[ "${TESTS:-1}" = 1 ] && timeout 150 python3 -m pytest tests/test_gpu_path.py -x -q -s -p no:cacheprovider -W ignore 2>&1 | grep -E "nvJPEG|after resize|passed|failed|Error" | tail -12
WORK=/tmp/pnsfw-bench
eval "set -- ${VARIANTS:-\"\"}"
python3 scripts/bench_index.py --device cuda --thumbs "$THUMBS" --photos "$PHOTOS" --workers 16 --no-faiss \
    --cr-python /tmp/crbin --pnsfw /tmp/bin/pnsfw --workdir $WORK --out "$OUTDIR/bench_index_gpu.json" \
    --ours-variants "$@" 2>&1 | grep -v '^\s*$' | tail -20
[ "${STAGES:-1}" = 1 ] && for kind in thumbs photos; do
    python3 scripts/bench_gpu_stages.py $WORK/$kind --model $WORK/vit-b-32-seed0.pt --batch 512 \
        --out "$OUTDIR/stages_$kind.json" 2>&1 | grep -v Warning | tail -6
done
for f in $WORK/runs/*.log; do echo "== $f"; grep "pnsfw trace" "$f"; tail -c 600 "$f"; done > "$OUTDIR/run_logs.txt"
grep -h -B1 "pnsfw trace" $WORK/runs/*.log | head -60
