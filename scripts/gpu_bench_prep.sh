# Sourced by the docs/bench_index_gpu_h200_round*.sh call scripts on the GPU machine, from the repo root:
# prep() installs the carried wheels (.whl/) into /tmp/site and writes the wrappers the benchmarks run;
# stage_table DIR prints each run's --stage-stats figures of DIR.

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
