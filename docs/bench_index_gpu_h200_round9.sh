# GPU indexing, round 9 (session 10): the device calls, run from the repo root on the H200 machine with the
# wheels of round 7 in .whl/ (clip-anytorch 2.6.0, ftfy 6.3.1, wcwidth 0.2.13, clip-retrieval 2.45.0, all_clip
# 1.3.0, fire 0.7.1, termcolor 3.3.0, braceexpand 0.1.7, webdataset 0.2.111). Each call: bash this-file CALL
# (prep, then one of call1..; what each call's code was is in docs/benchmarks.md, round 9).

. scripts/gpu_bench_prep.sh  # prep()

call1() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
python3 -c "import torch, torchvision, numpy, sys, triton; print(torch.__version__, torchvision.__version__, numpy.__version__, sys.version.split()[0], 'triton', triton.__version__)"
for i in 1 2 3; do python3 -c "import time; t=time.perf_counter(); import torch; print('import torch s', round(time.perf_counter()-t, 2))"; done
python3 -X importtime -c "import torch" 2> $OUT/importtime.txt; sort -t'|' -k2 -n $OUT/importtime.txt | tail -6 | cut -c1-120
t0=$(date +%s)
python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
echo "corpora $(( $(date +%s) - t0 )) s"
timeout 120 python3 -m pytest -q -x tests/test_gpu_profile.py tests/test_gpu_nvjpeg.py tests/test_gpu_path.py -p no:cacheprovider -W ignore 2>&1 | tail -2
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 150 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor --ours-variants '' "gpu-profile=$OUT/profile_thumbs.json" 'batch-size=2048' --out $OUT/thumbs.json 2>&1 | grep -v '^\s*$' | tail -4
timeout 60 python3 $B --run-timeout 40 --thumbs 0 --photos 10000 --skip-anchor --out $OUT/photos.json 2>&1 | grep -v '^\s*$' | tail -2
timeout 300 python3 $B --run-timeout 250 --thumbs 100000 --photos 0 --skip-anchor --ours-variants 'compile=on' 'compile=on' --out $OUT/compile.json 2>&1 | grep -v '^\s*$' | tail -3
kill $DMON
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob("/tmp/pnsfw-bench/runs/*.stages.json")):
    s = json.load(open(f)); print(f.split("/")[-1], {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items() if k in ("decode_s", "device_decode_call_s", "wait_input_s", "encode_s", "wait_features_s", "write_s", "read_s")})
PY
for f in $W/runs/*.log; do echo "== $f"; grep "timeline\|writer thread\|profile" "$f" | sed -E 's/.*(timeline|pipeline)\] +//'; done > $OUT/run_logs.txt
grep -A24 "thumbs-ours.log" $OUT/run_logs.txt | head -24; grep -A22 "photos-ours.log" $OUT/run_logs.txt | grep "first\|decoder"
python3 - <<'PY'
import json, os
p = os.environ["OUT"] + "/profile_thumbs.json"
s = json.load(open(p)); print({k: v for k, v in s.items() if k != "streams"})
for k, v in list(s["streams"].items())[:8]:
    print(k, v["busy_ms_per_unit"], v["events"], v["by_kind_ms"], v["top_ms"][:4])
PY
rm -f $OUT/*.trace.json.gz; gzip -9 $OUT/profile_thumbs.json.trace.json; ls -la $OUT | head -30
}

call2() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
timeout 150 python3 -m pytest -q -rf tests/test_gpu_profile.py tests/test_gpu_nvjpeg.py tests/test_gpu_path.py tests/test_gpu_tower.py -p no:cacheprovider -W ignore 2>&1 | tail -6
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 200 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor --ours-variants '' '' "gpu-profile=$OUT/profile_thumbs.json" 'workers=8' --out $OUT/thumbs.json 2>&1 | grep -v '^\s*$' | tail -5
timeout 60 python3 $B --run-timeout 40 --thumbs 0 --photos 10000 --skip-anchor --out $OUT/photos.json 2>&1 | grep -v '^\s*$' | tail -2
timeout 280 python3 $B --run-timeout 200 --thumbs 100000 --photos 0 --skip-anchor --ours-variants 'compile=on' 'compile=on' --out $OUT/compile.json 2>&1 | grep -v '^\s*$' | tail -3
kill $DMON
mkdir -p $OUT/stages; cp $W/runs/*.stages.json $OUT/stages/
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob("/tmp/pnsfw-bench/runs/*.stages.json")):
    s = json.load(open(f)); print(f.split("/")[-1], {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items() if k in ("decode_s", "device_decode_call_s", "wait_input_s", "encode_s", "wait_features_s", "write_s", "read_s", "nvjpeg_calls")})
PY
for f in $W/runs/*.log; do echo "== $f"; grep "timeline\|writer thread\|profile\|rror" "$f" | sed -E 's/.*(timeline|pipeline)\] +//' | cut -c1-300; done > $OUT/run_logs.txt
grep -A20 "thumbs-ours.log" $OUT/run_logs.txt | grep "first\|ready\|made\|import"; grep -A30 "compile-on" $OUT/run_logs.txt | grep "first\|ready\|rror" | head
python3 - <<'PY'
import json, os
p = os.environ["OUT"] + "/profile_thumbs.json"
s = json.load(open(p)); print({k: v for k, v in s.items() if k != "streams"})
for k, v in list(s["streams"].items())[:4]:
    print(k, v["busy_ms_per_unit"], v["events"], v["by_kind_ms"], v["top_ms"][:2])
PY
gzip -9 $OUT/profile_thumbs.json.trace.json; ls -la $OUT | wc -l
}

call3() {
# .whl/old: `git archive 3221bca pnsfw` (round 8's code), run beside this round's in the same call
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
printf '#!/bin/sh\nPYTHONPATH=/tmp/site:%s/.whl/old exec %s -P -c "import sys; from pnsfw.cli import main; sys.argv[0] = \\"pnsfw\\"; main()" "$@"\n' \
    "$PWD" "$PY" > /tmp/bin/pnsfw-old && chmod +x /tmp/bin/pnsfw-old
t0=$(date +%s); python3 $B --thumbs 100000 --photos 30000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1; echo "corpora $(( $(date +%s) - t0 )) s"
timeout 60 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py -p no:cacheprovider -W ignore 2>&1 | tail -2
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
OLD="--pnsfw /tmp/bin/pnsfw-old --ours-variants commit-every=60s"
timeout 60 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor $OLD --out $OUT/thumbs_old1.json 2>&1 | grep -v '^\s*$' | tail -1
timeout 60 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor --out $OUT/thumbs_new1.json 2>&1 | grep -v '^\s*$' | tail -1
timeout 150 python3 $B --run-timeout 110 --thumbs 100000 --photos 0 --out $OUT/thumbs_anchor_new2.json 2>&1 | grep -v '^\s*$' | tail -2
timeout 60 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor $OLD --out $OUT/thumbs_old2.json 2>&1 | grep -v '^\s*$' | tail -1
timeout 80 python3 $B --run-timeout 60 --thumbs 0 --photos 30000 --skip-anchor --out $OUT/photos.json 2>&1 | grep -v '^\s*$' | tail -1
mkdir -p $OUT/stages; cp $W/runs/*.stages.json $OUT/stages/
for f in $W/runs/*.log; do echo "== $f"; grep "timeline\|writer thread\|rror" "$f" | sed -E 's/.*(timeline|pipeline)\] +//' | cut -c1-300; done > $OUT/run_logs.txt
echo "== 1m"; timeout 200 python3 scripts/bench_index.py --device cuda --workers 16 --no-faiss --trace --distinct 1000 --pnsfw /tmp/bin/pnsfw --workdir /tmp/pnsfw-1m --run-timeout 110 --thumbs 1000000 --photos 0 --skip-anchor --out $OUT/1m.json 2>&1 | grep -v '^\s*$' | tail -2
kill $DMON
cp /tmp/pnsfw-1m/runs/*.stages.json $OUT/stages/1m.stages.json
for f in /tmp/pnsfw-1m/runs/*.log; do echo "== 1m $f"; grep "timeline\|writer thread" "$f" | sed -E 's/.*(timeline|pipeline)\] +//'; done >> $OUT/run_logs.txt
python3 - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/stages/*.json")):
    s = json.load(open(f)); print(f.split("/")[-1], {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items() if k in ("decode_s", "device_decode_call_s", "wait_input_s", "encode_s", "wait_features_s", "read_s", "nvjpeg_calls")})
PY
grep "first batch" $OUT/run_logs.txt
}

call4() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 150 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor --ours-variants '' 'gpu-bitstreams=pinned' --ours-repeats 2 --out $OUT/thumbs.json 2>&1 | grep -v '^\s*$' | tail -5
timeout 40 python3 $B --run-timeout 30 --thumbs 100000 --photos 0 --skip-anchor --ours-variants 'gpu-resize=encoder' --out $OUT/thumbs_resize.json 2>&1 | grep -v '^\s*$' | tail -1
printf '#!/bin/sh\nPYTHONPATH=/tmp/site:%s/.whl/old exec %s -P -c "import sys; from pnsfw.cli import main; sys.argv[0] = \\"pnsfw\\"; main()" "$@"\n' \
    "$PWD" "$PY" > /tmp/bin/pnsfw-old && chmod +x /tmp/bin/pnsfw-old
timeout 40 python3 $B --run-timeout 30 --thumbs 100000 --photos 0 --skip-anchor --pnsfw /tmp/bin/pnsfw-old --ours-variants commit-every=60s --out $OUT/thumbs_old.json 2>&1 | grep -v '^\s*$' | tail -1
timeout 60 python3 $B --run-timeout 25 --thumbs 0 --photos 10000 --skip-anchor --ours-variants '' 'gpu-bitstreams=pinned' --out $OUT/photos.json 2>&1 | grep -v '^\s*$' | tail -2
kill $DMON
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob("/tmp/pnsfw-bench/runs/*.stages.json")):
    s = json.load(open(f)); print(f.split("/")[-1], {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items() if k in ("decode_s", "device_decode_call_s", "wait_input_s", "encode_s", "wait_features_s", "read_s", "nvjpeg_calls")})
PY
}

set -u; prep; "call$1"
