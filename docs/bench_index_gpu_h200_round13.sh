# GPU indexing, round 13: the device calls, run from the repo root on the H200 machine with the wheels of
# round 12 in .whl/ (clip-anytorch 2.6.0, ftfy 6.3.1, wcwidth 0.2.13, clip-retrieval 2.45.0, all_clip 1.3.0, fire
# 0.7.1, termcolor 3.3.0, braceexpand 0.1.7, webdataset 0.2.111, threadpoolctl 3.8.0). Each call: bash
# this-file N (prep, then callN), with carry [".whl"]. $OUT returns at most 8 files: each call writes fewer.
# Call 1: a new store now forks the workers and imports torch beside the folder's listing (at 1M files the
# listing took 0.9-1.3 s before the lock, and torch's import only started after it), and the folder walk yields
# names without building a path object per file. Ours against 6c345fa's code (`sh scripts/baseline_pnsfw.sh
# archive 6c345fa .whl/base` before the call) at 1M, paired; then clip-retrieval against ours on 100k.
# Call 1 found that a thread importing torch starves the listing (the main thread's walk reached its first entry
# only when the import ended: store locked at 4.0-4.5 s at 100k, 4.5-6.8 s at 1M), so nothing was won. A child
# process now lists the folder (pnsfw/indexer/walk.py). Call 2: ours against 6c345fa at 1M, paired, again.
# Call 3 (one machine: the kernel cache lives in its ~/.cache): `--compile on` now replays the compiled tower
# from the CUDA graph (round 12's compiled runs were bound by their launches: 44.6 s of 75.7 s in the tower's
# calls). A cold compile on a small corpus (fills the cache), then compile=on at 1M.
# Call 3's 1M run did not reach "image tower ready" within its 100 s (the 2k run before it compiled for 202 s,
# so the cache it filled was not hit, or the graph capture of the compiled tower stalls). Call 4, on a fresh
# machine: compile=on at 1M alone, cold, with room for the compile, and its log back.

. scripts/gpu_bench_prep.sh  # prep(), stage_table()

call1() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora_1m.json | tail -1
sync
timeout 60 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py tests/test_concurrency.py -p no:cacheprovider \
    -W ignore 2>&1 | tail -2
sh scripts/baseline_pnsfw.sh wrapper .whl/base /tmp/bin/pnsfw-base
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 290 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 80 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants '' --baseline /tmp/bin/pnsfw-base --ours-repeats 2 --out $OUT/thumbs_1m.json 2>&1 \
    | grep -v '^\s*$' | tail -6
timeout 130 python3 $B --run-timeout 100 --thumbs 100000 --photos 0 --ours-variants '' --ours-repeats 2 \
    --out $OUT/thumbs_anchor.json 2>&1 | grep -v '^\s*$' | tail -4
kill $DMON
stage_table /tmp/pnsfw-1m/runs
}

call2() {
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora_1m.json | tail -1
sync
sh scripts/baseline_pnsfw.sh wrapper .whl/base /tmp/bin/pnsfw-base
timeout 290 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 80 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants '' --baseline /tmp/bin/pnsfw-base --ours-repeats 2 --out $OUT/thumbs_1m.json 2>&1 \
    | grep -v '^\s*$' | tail -6
stage_table /tmp/pnsfw-1m/runs
}

call3() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora_1m.json | tail -1
sync
timeout 390 python3 $B --workdir /tmp/pnsfw-2k --run-timeout 380 --thumbs 2000 --photos 0 --skip-anchor \
    --ours-variants 'compile=on' --out $OUT/thumbs_compile_cold.json 2>&1 | grep -v '^\s*$' | tail -2
timeout 110 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 100 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants 'compile=on' --out $OUT/thumbs_1m_compile.json 2>&1 | grep -v '^\s*$' | tail -2
stage_table /tmp/pnsfw-1m/runs
}

call4() {
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora_1m.json | tail -1
sync
timeout 420 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 400 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants 'compile=on' --out $OUT/thumbs_1m_compile.json 2>&1 | grep -v '^\s*$' | tail -2
stage_table /tmp/pnsfw-1m/runs
cat /tmp/pnsfw-1m/runs/*compile*.log | gzip -c > $OUT/run_log.txt.gz
}

set -u; prep; "call$1" "$@"
