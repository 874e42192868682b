#!/bin/bash
# GPU indexing benchmark, run from the repo root on the GPU machine (see docs/benchmarks.md, "GPU indexing").
# Needs python3 with torch + torchvision (CUDA), pillow, pyarrow, numpy, click, tqdm, scikit-image, and the
# pure-Python wheels in .whl/ (installed into /tmp/site here): clip-anytorch, ftfy, wcwidth, and for the
# anchor clip-retrieval 2.45.0, all_clip, fire, termcolor, braceexpand, webdataset 0.2.111.
# Usage: [TESTS=0] [STAGES=0] [NVJPEG=0] [ANCHOR=0] [VARIANTS="'' 'gpu-tower=reference' ..."] [DISTINCT=N] \
#        [PYSPY=1] scripts/run_gpu_bench.sh THUMBS PHOTOS [OUTDIR]
# (VARIANTS: one pnsfw run per corpus for each quoted set of extra `pnsfw index` options, dashes left out;
# '' = the defaults. DISTINCT: render only N images per corpus, the rest are commented copies (bench_index.py
# --distinct). PYSPY=1: two more default runs on the thumbnails under py-spy (the py-spy wheel in .whl/): all
# threads' stacks with native frames, then only the GIL holder's; raw collapsed stacks in OUTDIR.)
set -u
THUMBS=${1:-100000}; PHOTOS=${2:-10000}; OUTDIR=${3:-${OUT:-/tmp/out}}
mkdir -p "$OUTDIR" /tmp/crbin /tmp/bin
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
# a wrapper, not a symlink: a symlinked venv interpreter outside its venv loses the venv's packages
PY=$(python3 -c 'import sys; print(sys.executable)')
printf '#!/bin/sh\nexec %s "$@"\n' "$PY" > /tmp/crbin/python && chmod +x /tmp/crbin/python
printf '#!/bin/sh\nexec %s -c "import sys; from pnsfw.cli import main; sys.argv[0] = \\"pnsfw\\"; main()" "$@"\n' \
    "$PY" > /tmp/bin/pnsfw && chmod +x /tmp/bin/pnsfw
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc; python3 -c "import torch, torchvision, numpy; print(torch.__version__, torchvision.__version__, numpy.__version__)"
[ "${TESTS:-1}" = 1 ] && timeout 180 python3 -m pytest tests/test_gpu_path.py tests/test_gpu_tower.py \
    tests/test_gpu_nvjpeg.py -x -q -s \
    -p no:cacheprovider -W ignore 2>&1 | grep -E "nvJPEG|after resize|passed|failed|Error" | tail -12
WORK=/tmp/pnsfw-bench
BENCH="scripts/bench_index.py --run-timeout ${RUN_TIMEOUT:-0} --device cuda --thumbs $THUMBS --photos $PHOTOS --workers 16 --no-faiss --trace --workdir $WORK --distinct ${DISTINCT:-0}"
python3 $BENCH --skip-anchor --skip-ours --out "$OUTDIR/corpora.json" | tail -3  # corpora + checkpoint first
[ "${STAGES:-1}" = 1 ] && for kind in thumbs photos; do
    [ -d $WORK/$kind ] && python3 scripts/bench_gpu_stages.py $WORK/$kind --model $WORK/vit-b-32-seed0.pt \
        --batch 1024 --out "$OUTDIR/stages_$kind.json" 2>&1 | grep -v Warning | tail -16
done
[ "${NVJPEG:-1}" = 1 ] && [ -d $WORK/thumbs ] && timeout 240 python3 scripts/bench_nvjpeg.py $WORK/thumbs \
    --model $WORK/vit-b-32-seed0.pt --out "$OUTDIR/nvjpeg_thumbs.json" ${NVJPEG_ARGS:-} 2>&1 | grep -v Warning | tail -30
nvidia-smi dmon -s u -d 1 > "$OUTDIR/dmon.txt" 2>&1 &  # sm/mem/enc/dec/jpg utilisation, one line a second
DMON=$!
eval "set -- ${VARIANTS:-\"\"}"
timeout "${BENCH_TIMEOUT:-1800}" python3 $BENCH --cr-python /tmp/crbin --pnsfw /tmp/bin/pnsfw \
    --out "$OUTDIR/bench_index_gpu.json" $([ "${ANCHOR:-1}" = 1 ] || echo --skip-anchor) --ours-variants "$@" 2>&1 \
    | grep -v '^\s*$' | tail -20
kill $DMON
if [ "${PYSPY:-0}" = 1 ] && [ -x /tmp/site/bin/py-spy ]; then
    for mode in "idle --native" gil; do  # --native may be refused where ptrace is partial: then without it
        rm -rf $WORK/runs/pyspy-store; tag=${mode%% *}
        cmd="/tmp/bin/pnsfw index $WORK/thumbs --store $WORK/runs/pyspy-store --model $WORK/vit-b-32-seed0.pt \
             --device cuda --batch-size 1024 --workers 16 --no-faiss"
        timeout 120 /tmp/site/bin/py-spy record -r 50 --threads --$mode -f raw -o "$OUTDIR/pyspy_$tag.txt" -- $cmd \
            2>&1 | tail -3 || true
        [ -s "$OUTDIR/pyspy_$tag.txt" ] || timeout 120 /tmp/site/bin/py-spy record -r 50 --threads --${mode%% *} \
            -f raw -o "$OUTDIR/pyspy_$tag.txt" -- $cmd 2>&1 | tail -3
    done
fi
for f in $WORK/runs/*.log; do echo "== $f"; grep "timeline" "$f"
    if grep -q "^\[bench\] timed out" "$f"; then tail -c 200000 "$f"; else tail -c 600 "$f"; fi
done > "$OUTDIR/run_logs.txt"
grep -h "timeline" $WORK/runs/*.log | head -40
