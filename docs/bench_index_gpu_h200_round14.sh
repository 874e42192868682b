# GPU indexing, round 14: the device calls, run from the repo root on the H200 machine with the wheels of
# round 13 in .whl/ (clip-anytorch 2.6.0, ftfy 6.3.1, wcwidth 0.2.13, clip-retrieval 2.45.0, all_clip 1.3.0, fire
# 0.7.1, termcolor 3.3.0, braceexpand 0.1.7, webdataset 0.2.111, threadpoolctl 3.8.0). Each call: bash
# this-file N (prep, then callN), with carry [".whl"]. $OUT returns at most 8 files: each call writes fewer.
# Call 1: where the start-up goes. Round 13's first batch came at 5.9-7.8 s, torch's import ending at 4.1-5.2 s
# (2.4-3.1 s of import in round 12, 4.1-4.4 s in round 13). `import torch` alone in fresh processes (-X
# importtime), beside an early CUDA context, and beside 16 forked idle processes; then two 100k runs under
# scripts/probe_startup.py (every thread's stack sampled each 5 ms for the first 9 s).
# Call 1 found: torch's folder has no __pycache__ (the image never writes bytecode, so each process compiles
# torch's sources), `import torch` alone 2.6-3.1 s (4.3 s cold) with or without the early CUDA context or 16
# forked processes beside it, and in `pnsfw index` the tower's warm-up forward on zeros (batch 256) took the
# main thread 1.5 s after the encoder loaded: 1.2 s of it inside `_attention`'s C calls.
# Call 2: the first call of each op of the fast tower timed alone (scripts/bench_gpu_startup.py --modes ops
# ops_eager), and `import torch` with its bytecode compiled beforehand (PYTHONPYCACHEPREFIX) as a pip install
# leaves it.
# Call 2 found: the device image sets PYTHONDONTWRITEBYTECODE=1, so every process compiles torch's sources;
# compiled beforehand, `import torch` took 1.62-2.19 s against 2.76-3.07 s. The tower's first SDPA calls cost
# 0.95 s on a cold machine and 0.10 s warm. Warm, the first unit waited for the decode threads' nvJPEG handles
# (0.4-0.8 s each, made at the first unit): they are now made on the CUDA context's thread while torch imports.
# Call 3: ours against 0dfaf47's code (.whl/base) at 1M, paired; the anchor at 100k; the GPU tests.

. scripts/gpu_bench_prep.sh  # prep(), stage_table()

import_beside() {  # $1: none | context | forked; prints the seconds `import torch` took
python3 - "$1" <<'PY'
import os, sys, time
if sys.argv[1] == "forked":
    kids = [os.fork() or (time.sleep(6), os._exit(0)) for _ in range(16)]
if sys.argv[1] == "context":
    from pnsfw.indexer.gpu.context import start_context
    start_context("cuda")
started = time.perf_counter()
import torch
print(sys.argv[1], round(time.perf_counter() - started, 3))
PY
}

call1() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
python3 -c "import torch, os; d = os.path.dirname(torch.__file__); c = d + '/__pycache__'; print(d, 'writable', os.access(d, os.W_OK), 'pycache', os.path.isdir(c) and len(os.listdir(c)))"
python3 scripts/probe_startup.py --importtime 3 --out $OUT/alone.json 2>&1 | tail -1
for i in 1 2; do for m in none context forked; do import_beside $m; done; done
for i in 1 2; do TORCH_DEVICE_BACKEND_AUTOLOAD=0 import_beside none; done
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
sync
for i in 1 2; do
  rm -rf /tmp/probe-store
  timeout 60 python3 scripts/probe_startup.py --until 9 --out $OUT/probe_$i.json -- --log-level debug index \
      $W/thumbs --store /tmp/probe-store --model $W/vit-b-32-seed0.pt --device cuda --batch-size 1024 \
      --workers 16 --no-faiss 2> /tmp/probe_$i.log | tail -1
  grep -E "timeline|indexed" /tmp/probe_$i.log | sed 's/.*timeline\] *//' > $OUT/probe_${i}_log.txt
  tail -3 $OUT/probe_${i}_log.txt
done
}

call2() {
env | grep -E '^PYTHON' ; python3 -c "import sys; print('dont_write_bytecode', sys.flags.dont_write_bytecode, sys.pycache_prefix)"
python3 $B --thumbs 100 --photos 0 --skip-anchor --skip-ours --out /tmp/c.json | tail -1
python3 scripts/bench_gpu_startup.py $W/vit-b-32-seed0.pt --modes ops ops_eager --runs 2 --out $OUT/ops.json 2>&1 | cut -c1-1500
T=$(python3 -c "import torch, os; print(os.path.dirname(torch.__file__))" 2>/dev/null)
( time PYTHONPYCACHEPREFIX=/tmp/pyc python3 -m compileall -q -j 16 $T $(dirname $T)/torchvision $(dirname $T)/numpy > /dev/null ) 2>&1 | grep real
for i in 1 2 3; do PYTHONPYCACHEPREFIX=/tmp/pyc import_beside none; import_beside none; done
}

call3() {
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora_1m.json | tail -1
sync
timeout 90 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py -p no:cacheprovider -W ignore 2>&1 | tail -2
sh scripts/baseline_pnsfw.sh wrapper .whl/base /tmp/bin/pnsfw-base
timeout 280 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 80 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants '' --baseline /tmp/bin/pnsfw-base --ours-repeats 2 --out $OUT/thumbs_1m.json 2>&1 \
    | grep -v '^\s*$' | tail -6
timeout 140 python3 $B --run-timeout 100 --thumbs 100000 --photos 0 --ours-variants '' --ours-repeats 2 \
    --out $OUT/thumbs_anchor.json 2>&1 | grep -v '^\s*$' | tail -4
stage_table /tmp/pnsfw-1m/runs
}

set -u; prep; "call$1" "$@"
