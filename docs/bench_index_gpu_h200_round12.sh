# GPU indexing, round 12: the device calls, run from the repo root on the H200 machine with the wheels of
# round 7 in .whl/ (clip-anytorch 2.6.0, ftfy 6.3.1, wcwidth 0.2.13, clip-retrieval 2.45.0, all_clip 1.3.0, fire
# 0.7.1, termcolor 3.3.0, braceexpand 0.1.7, webdataset 0.2.111) and threadpoolctl 3.8.0. Each call: bash
# this-file N (prep, then callN), with carry [".whl"]. Round 11 made the SMs decode the thumbnails (auto) and left two leads: the encoder loop's
# unaccounted time (now with its CPU time, the collector's pauses and no stats lock per unit) and, at 1M, where
# the GPU is the bound, the tower's stream above the decoders' (one confounded pair) or a faster, compiled tower.
# Call 1: auto against engines on 100k, and auto with and without the tower's stream high at 1M, in turn.
# Call 2: clip-retrieval against auto on 100k, auto paired with .whl/base (1fb1b38's code, before session 14's
# exit without the interpreter's teardown, the writer's batches made ready as they arrive and one BLAS thread;
# `scripts/baseline_pnsfw.sh archive 1fb1b38 .whl/base` before the call; .whl/ also carries threadpoolctl 3.8.0,
# which the image lacks); the compiled tower (the first run fills the kernel cache) on 100k and then 1M.
# Call 3: the cyclic collector quieted (concurrency.quiet_collector: what lives at the stream's start frozen, the
# youngest generation collected every 10,000 allocations) paired with .whl/base (182bcea's code, the calls 1-2
# code: `scripts/baseline_pnsfw.sh archive 182bcea .whl/base`) on 100k and 1M, then the tower's stream ahead of
# the decoders' once more at 1M.

. scripts/gpu_bench_prep.sh  # prep(), stage_table()

call1() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora_1m.json | tail -1
sync  # round 11's first 1M run read while the new corpus was still being written back (its reads 144 s against 87)
timeout 60 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py -p no:cacheprovider -W ignore 2>&1 | tail -2
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 120 python3 $B --run-timeout 25 --thumbs 100000 --photos 0 --skip-anchor --ours-variants '' 'gpu-decoder=engines' \
    --ours-repeats 2 --out $OUT/thumbs.json 2>&1 | grep -v '^\s*$' | tail -5
timeout 330 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 80 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants '' 'gpu-decode-priority=low' --ours-repeats 2 --out $OUT/thumbs_1m.json 2>&1 | grep -v '^\s*$' | tail -5
kill $DMON
stage_table $W/runs; stage_table /tmp/pnsfw-1m/runs
}

call2() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
sh scripts/baseline_pnsfw.sh wrapper .whl/base /tmp/bin/pnsfw-base
timeout 270 python3 $B --run-timeout 150 --thumbs 100000 --photos 0 --ours-variants '' --baseline /tmp/bin/pnsfw-base \
    --ours-repeats 2 --out $OUT/thumbs_anchor.json 2>&1 | grep -v '^\s*$' | tail -8
timeout 240 python3 $B --run-timeout 200 --thumbs 100000 --photos 0 --skip-anchor --ours-variants 'compile=on' \
    --out $OUT/thumbs_compile_cold.json 2>&1 | grep -v '^\s*$' | tail -2
timeout 60 python3 $B --run-timeout 25 --thumbs 100000 --photos 0 --skip-anchor --ours-variants 'compile=on' '' \
    --out $OUT/thumbs_compile.json 2>&1 | grep -v '^\s*$' | tail -3
timeout 150 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 90 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants 'compile=on' --out $OUT/thumbs_1m_compile.json 2>&1 | grep -v '^\s*$' | tail -2
stage_table $W/runs; stage_table /tmp/pnsfw-1m/runs
}

call3() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora_1m.json | tail -1
sync
timeout 60 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py tests/test_concurrency.py -p no:cacheprovider \
    -W ignore 2>&1 | tail -2
sh scripts/baseline_pnsfw.sh wrapper .whl/base /tmp/bin/pnsfw-base
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 100 python3 $B --run-timeout 25 --thumbs 100000 --photos 0 --skip-anchor --ours-variants '' \
    --baseline /tmp/bin/pnsfw-base --ours-repeats 2 --out $OUT/thumbs.json 2>&1 | grep -v '^\s*$' | tail -6
timeout 280 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 80 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants '' --baseline /tmp/bin/pnsfw-base --ours-repeats 2 --out $OUT/thumbs_1m.json 2>&1 \
    | grep -v '^\s*$' | tail -6
timeout 80 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 75 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants 'gpu-decode-priority=low' --out $OUT/thumbs_1m_low.json 2>&1 | grep -v '^\s*$' | tail -2
kill $DMON
stage_table $W/runs; stage_table /tmp/pnsfw-1m/runs
}

set -u; prep; "call$1" "$@"
