# Sourced by the docs/bench_index_gpu_h200_round*.sh call scripts on the GPU machine, from the repo root:
# prep() installs the carried wheels (.whl/) into /tmp/site and writes the wrappers the benchmarks run;
# stage_table DIR prints each run's --stage-stats figures of DIR; then the steps the call scripts compose (after
# prep: $B, $W, $OUT): the GPU's name, the corpora, the GPU tests, the start-up probe, the bytecode compiled
# ahead, ours paired with /tmp/bin/pnsfw-base (the carried .whl/base), the anchor.

prep() {
# sourced on the GPU machine from the repo root: wheels, wrappers, env
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
mkdir -p /tmp/crbin /tmp/bin
PY=$(python3 -c 'import sys; print(sys.executable)')
printf '#!/bin/sh\nexec %s "$@"\n' "$PY" > /tmp/crbin/python && chmod +x /tmp/crbin/python
printf '#!/bin/sh\nexec %s -c "import sys; from pnsfw.cli import main; sys.argv[0] = \\"pnsfw\\"; main()" "$@"\n' \
    "$PY" > /tmp/bin/pnsfw && chmod +x /tmp/bin/pnsfw
W=/tmp/pnsfw-bench
B="scripts/bench_index.py --device cuda --workers 16 --no-faiss --trace --distinct 1000 --cr-python /tmp/crbin --pnsfw /tmp/bin/pnsfw --workdir $W"
TUNED="glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=17179869184"
}

stage_table() {
python3 - "$@" <<'PY'
import json, glob, sys
keys = ("decode_s", "device_decode_call_s", "wait_input_s", "encode_s", "wait_features_s", "write_s", "poll_s",
        "encoder_s", "encoder_cpu_s", "gc_s", "gc_collections", "gc_longest_s", "read_s", "sm_decoder_calls",
        "nvjpeg_calls")
for f in sorted(glob.glob(sys.argv[1] + "/*.stages.json")):
    s = json.load(open(f)); print(f.split("/")[-1], {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items() if k in keys})
PY
}

precompile() {  # bytecode of every module the runs import, under /tmp/pyc (the image's folders are read-only)
SITE=$(python3 -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
STD=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
( time PYTHONPYCACHEPREFIX=/tmp/pyc python3 -m compileall -q -j 16 "$SITE" "$STD" /tmp/site "$PWD/pnsfw" \
    .whl/base > /dev/null 2>&1 ) 2>&1 | grep real
}

probe() {  # $1: the run's name; one 100k run of pnsfw index under the stack sampler
rm -rf /tmp/probe-store
timeout 60 python3 scripts/probe_startup.py --until 9 --out $OUT/probe_$1.json -- --log-level debug index \
    $W/thumbs --store /tmp/probe-store --model $W/vit-b-32-seed0.pt --device cuda --batch-size 1024 \
    --workers 16 --no-faiss 2> /tmp/probe_$1.log | tail -1
grep -E "timeline|indexed" /tmp/probe_$1.log | sed 's/.*timeline\] *//' > $OUT/probe_$1_log.txt
grep -E "torch imported|tower ready|first unit decoded|first batch" $OUT/probe_$1_log.txt
}

gpu() { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; }
corpus_100k() { python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out /tmp/corpora.json | tail -1; sync; }
corpus_1m() {
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out /tmp/c1m.json | tail -1
sync; sh scripts/baseline_pnsfw.sh wrapper .whl/base /tmp/bin/pnsfw-base
}
gpu_tests() {
timeout 120 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py tests/test_gpu_tower.py \
    -p no:cacheprovider -W ignore 2>&1 | tail -3
}
pair_100k() {  # $1: repeats, $2: the JSON's name; ours against .whl/base's code at 100k (first batch, e2e)
sh scripts/baseline_pnsfw.sh wrapper .whl/base /tmp/bin/pnsfw-base
timeout 200 python3 $B --run-timeout 60 --thumbs 100000 --photos 0 --skip-anchor --ours-variants '' \
    --baseline /tmp/bin/pnsfw-base --ours-repeats $1 --out $OUT/$2.json 2>&1 | grep -v '^\s*$' | tail -6
}
pair_1m() {  # $1: repeats, $2: the JSON's name, $3: the time limit; ours against .whl/base's code at 1M
timeout $3 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 80 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants '' --baseline /tmp/bin/pnsfw-base --ours-repeats $1 --out $OUT/$2.json 2>&1 \
    | grep -v '^\s*$' | tail -6
}
anchor() {  # $1: repeats of ours, then any more options (--baseline ...)
local repeats=$1; shift
timeout 200 python3 $B --run-timeout 100 --thumbs 100000 --photos 0 --ours-variants '' --ours-repeats $repeats \
    "$@" --out $OUT/thumbs_anchor.json 2>&1 | grep -v '^\s*$' | tail -8
}

tower_stages() {  # $1: the JSON's name; each stage alone, then the tower variants (scripts/bench_gpu_stages.py)
timeout 150 python3 scripts/bench_gpu_stages.py $W/thumbs --model $W/vit-b-32-seed0.pt --batch 1024 \
    --out $OUT/$1.json 2>&1 | grep -E "^tower|encode|chain|resize" | tail -12
}
