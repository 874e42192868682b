# GPU indexing, round 13: the device calls, run from the repo root on the H200 machine with the wheels of
# round 12 in .whl/ (clip-anytorch 2.6.0, ftfy 6.3.1, wcwidth 0.2.13, clip-retrieval 2.45.0, all_clip 1.3.0, fire
# 0.7.1, termcolor 3.3.0, braceexpand 0.1.7, webdataset 0.2.111, threadpoolctl 3.8.0). Each call: bash
# this-file N (prep, then callN), with carry [".whl"]. $OUT returns at most 8 files: each call writes fewer.
# Round 12 quieted the cyclic collector (1M thumbnails 19,631 img/s end to end, 22,381 steady, the GPU 87-97 %
# busy while active) and marks the exit's phases on the timeline. With the collector's pauses gone the decoders'
# balance may have moved: the SMs (auto) against the JPEG engines, alone or with SM threads beside them, at 1M,
# where the GPU's SMs are the bound; then clip-retrieval against auto on 100k (the ratio target).
# Call 2 (one machine: the kernel cache lives in its ~/.cache): `--compile on` now replays the compiled tower
# from the CUDA graph (round 12's compiled runs were bound by their launches: 44.6 s of 75.7 s in the tower's
# calls). The default at 1M, a cold compile on a small corpus (fills the cache), then compile=on at 1M.

. scripts/gpu_bench_prep.sh  # prep(), stage_table()

call1() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora_1m.json | tail -1
sync
timeout 60 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py tests/test_concurrency.py -p no:cacheprovider \
    -W ignore 2>&1 | tail -2
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 380 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 80 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants '' 'gpu-decoder=engines' 'gpu-decoder=engines gpu-sm-decoders=2' --ours-repeats 2 \
    --out $OUT/thumbs_1m.json 2>&1 | grep -v '^\s*$' | tail -7
timeout 130 python3 $B --run-timeout 100 --thumbs 100000 --photos 0 --ours-variants '' --ours-repeats 2 \
    --out $OUT/thumbs_anchor.json 2>&1 | grep -v '^\s*$' | tail -4
kill $DMON
stage_table /tmp/pnsfw-1m/runs
}

call2() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 $B --workdir /tmp/pnsfw-1m --thumbs 1000000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora_1m.json | tail -1
sync
timeout 90 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 80 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants '' --out $OUT/thumbs_1m.json 2>&1 | grep -v '^\s*$' | tail -2
timeout 390 python3 $B --workdir /tmp/pnsfw-2k --run-timeout 380 --thumbs 2000 --photos 0 --skip-anchor \
    --ours-variants 'compile=on' --out $OUT/thumbs_compile_cold.json 2>&1 | grep -v '^\s*$' | tail -2
timeout 110 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 100 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants 'compile=on' --out $OUT/thumbs_1m_compile.json 2>&1 | grep -v '^\s*$' | tail -2
stage_table /tmp/pnsfw-1m/runs
}

set -u; prep; "call$1" "$@"
