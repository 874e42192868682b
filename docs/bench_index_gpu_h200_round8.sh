# GPU indexing, round 8 (session 9): the four device calls, run from the repo root on the H200 machine with
# the wheels of round 7 in .whl/ (clip-anytorch 2.6.0, ftfy 6.3.1, wcwidth 0.2.13, clip-retrieval 2.45.0, all_clip
# 1.3.0, fire 0.7.1, termcolor 3.3.0, braceexpand 0.1.7, webdataset 0.2.111). Each call: bash this-file CALL
# (prep, then one of call1..call4; what each call's code was is in docs/benchmarks.md, round 8).

. scripts/gpu_bench_prep.sh  # prep()

call1() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; lscpu | grep -E "Model name|Thread|Core|Socket"
python3 -c "import torch, torchvision, numpy; print(torch.__version__, torchvision.__version__, numpy.__version__)"
t0=$(date +%s)
python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -2
echo "corpora $(( $(date +%s) - t0 )) s"
timeout 120 python3 scripts/probe_nvjpeg_photos.py $W/thumbs --model $W/vit-b-32-seed0.pt --calls 6 --profile fresh_plus_4_readers_tower_own_stream --out $OUT/probe_thumbs.json 2>&1 | grep -v Warn
GLIBC_TUNABLES=$TUNED timeout 60 python3 scripts/probe_nvjpeg_photos.py $W/thumbs --model $W/vit-b-32-seed0.pt --calls 6 --only fresh fresh_plus_4_readers fresh_plus_4_readers_reused fresh_plus_4_readers_tower_own_stream --out $OUT/probe_thumbs_tuned.json 2>&1 | grep -v Warn
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 200 python3 $B --run-timeout 45 --thumbs 100000 --photos 10000 --skip-anchor --ours-variants '' 'gpu-decode-threads=3' 'gpu-decode-threads=4' --out $OUT/bench_a.json 2>&1 | grep -v '^\s*$' | tail -8
GLIBC_TUNABLES=$TUNED timeout 120 python3 $B --run-timeout 45 --thumbs 100000 --photos 10000 --skip-anchor --out $OUT/bench_tuned.json 2>&1 | grep -v '^\s*$' | tail -4
kill $DMON
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob("/tmp/pnsfw-bench/runs/*.stages.json")):
    s = json.load(open(f)); print(f.split("/")[-1], {k: s.get(k) for k in ("decode_s", "device_decode_call_s", "wait_input_s", "encode_s", "read_s", "nvjpeg_calls")})
PY
timeout 60 python3 scripts/bench_gpu_startup.py $W/vit-b-32-seed0.pt --modes steps beside --runs 1 --out $OUT/startup.json 2>&1 | tail -2
grep -h "timeline" $W/runs/*.log | head -16 > $OUT/timelines.txt
}

call2() {
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
timeout 60 python3 -m pytest -q -x tests/test_gpu_tower.py -p no:cacheprovider -W ignore 2>&1 | tail -2
timeout 150 python3 scripts/probe_nvjpeg_photos.py $W/thumbs --model $W/vit-b-32-seed0.pt --calls 3 --green 124 116 100 --profile alone --only alone beside_graph_tower_own_stream beside_green_tower_124 beside_green_tower_116 beside_green_tower_100 fresh_plus_4_readers_green_tower_116 --out $OUT/probe_green.json 2>&1 | grep -v Warn | cut -c1-400
nvidia-smi dmon -s u -d 1 > $OUT/dmon2.txt 2>&1 & DMON=$!
timeout 330 python3 $B --run-timeout 40 --thumbs 100000 --photos 10000 --skip-anchor --ours-variants '' 'gpu-tower-sms=124' 'gpu-tower-sms=116' 'gpu-tower-sms=100' 'gpu-decode-priority=high' --out $OUT/bench_green.json 2>&1 | grep -v '^\s*$' | tail -12
kill $DMON
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob("/tmp/pnsfw-bench/runs/*.stages.json")):
    s = json.load(open(f)); print(f.split("/")[-1], {k: s.get(k) for k in ("decode_s", "device_decode_call_s", "wait_input_s", "encode_s", "nvjpeg_calls")})
PY
grep -h "green\|SMs" /tmp/pnsfw-bench/runs/*.log | sort | uniq -c | head
}

call3() {
python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
P="python3 scripts/probe_nvjpeg_photos.py"
timeout 100 $P $W/thumbs --model $W/vit-b-32-seed0.pt --calls 3 --only alone alone_yuv_output pinned beside_graph_tower_own_stream beside_graph_tower_own_stream_yuv_output --profile alone_yuv_output pinned beside_graph_tower_own_stream_yuv_output --out $OUT/probe_yuv_thumbs.json 2>&1 | grep -v Warn | cut -c1-300
timeout 60 $P $W/photos --model $W/vit-b-32-seed0.pt --calls 3 --only alone alone_yuv_output --profile alone_yuv_output --out $OUT/probe_yuv_photos.json 2>&1 | grep -v Warn | cut -c1-300
timeout 100 python3 $B --run-timeout 40 --thumbs 100000 --photos 10000 --skip-anchor --out $OUT/bench_plain.json 2>&1 | grep -v '^\s*$' | tail -3
CUDA_DEVICE_MAX_CONNECTIONS=32 timeout 100 python3 $B --run-timeout 40 --thumbs 100000 --photos 10000 --skip-anchor --out $OUT/bench_conn32.json 2>&1 | grep -v '^\s*$' | tail -3
grep -h "timeline" $W/runs/thumbs-ours.log | sed -E 's/.*timeline\] +//' | head -14
timeout 150 python3 -m pytest -q -x tests/test_gpu_path.py tests/test_gpu_nvjpeg.py -k "cuda or nvjpeg or early" -p no:cacheprovider -W ignore 2>&1 | tail -3
}

call4() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
python3 -c "import torch, torchvision, numpy, sys; print(torch.__version__, torchvision.__version__, numpy.__version__, sys.version.split()[0])"
timeout 90 python3 -m pytest -q -x tests/test_gpu_path.py tests/test_gpu_tower.py tests/test_gpu_nvjpeg.py -p no:cacheprovider -W ignore 2>&1 | tail -2
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 200 python3 $B --run-timeout 110 --thumbs 100000 --photos 0 --ours-variants '' '' 'gpu-decode-threads=3' --out $OUT/anchor.json 2>&1 | grep -v '^\s*$' | tail -5
timeout 100 python3 $B --run-timeout 40 --thumbs 0 --photos 10000 --skip-anchor --ours-variants '' 'gpu-decode-threads=3' 'gpu-decode-threads=4' --out $OUT/photos.json 2>&1 | grep -v '^\s*$' | tail -4
echo "== 1m"; timeout 150 python3 scripts/bench_index.py --device cuda --workers 16 --no-faiss --trace --distinct 1000 --pnsfw /tmp/bin/pnsfw --workdir /tmp/pnsfw-1m --run-timeout 110 --thumbs 1000000 --photos 0 --skip-anchor --out $OUT/1m.json 2>&1 | grep -v '^\s*$' | tail -2
kill $DMON
for f in $W/runs/*.log /tmp/pnsfw-1m/runs/*.log; do echo "== $f"; grep "timeline\|writer thread" "$f" | sed -E 's/.*(timeline|pipeline)\] +//'; done > $OUT/run_logs.txt
grep -A30 "thumbs-ours.log" $OUT/run_logs.txt | head -18
}

set -u; prep; "call$1"
