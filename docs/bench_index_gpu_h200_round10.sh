# GPU indexing, round 10 (session 11): the device calls, run from the repo root on the H200 machine with the
# wheels of round 7 in .whl/ (clip-anytorch 2.6.0, ftfy 6.3.1, wcwidth 0.2.13, clip-retrieval 2.45.0, all_clip
# 1.3.0, fire 0.7.1, termcolor 3.3.0, braceexpand 0.1.7, webdataset 0.2.111). Each call: bash this-file N
# (prep, then callN; what each call's code was is in docs/benchmarks.md, round 10).

. scripts/gpu_bench_prep.sh  # prep(), stage_table()

call1() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; which nvidia-cuda-mps-control
t0=$(date +%s); python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1; echo "corpora $(( $(date +%s) - t0 )) s"
timeout 90 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py -p no:cacheprovider -W ignore 2>&1 | tail -3
timeout 150 python3 scripts/probe_nvjpeg_photos.py $W/thumbs --model $W/vit-b-32-seed0.pt --calls 20 --out $OUT/probe.json \
    --only alone pinned beside_graph_tower_own_stream pinned_beside_graph_tower_own_stream beside_tower_in_child_process \
    alone_rgbi_output pinned_beside_graph_tower_own_stream_rgbi_output --profile alone_rgbi_output 2>&1 | grep -v Warning | cut -c1-1500 | tail -12
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 280 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor --ours-variants '' 'gpu-bitstreams=pinned' 'gpu-first-unit=cpu' --ours-repeats 2 --out $OUT/thumbs.json 2>&1 | grep -v '^\s*$' | tail -8
timeout 60 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor --ours-variants "gpu-bitstreams=pinned gpu-profile=$OUT/profile.json" --out $OUT/profile_run.json 2>&1 | grep -v '^\s*$' | tail -1
timeout 110 python3 $B --run-timeout 30 --thumbs 0 --photos 10000 --skip-anchor --ours-variants '' 'gpu-bitstreams=pinned' 'gpu-first-unit=cpu' --out $OUT/photos.json 2>&1 | grep -v '^\s*$' | tail -2
kill $DMON
stage_table $W/runs
python3 - <<'PY'
import json, os
s = json.load(open(os.environ["OUT"] + "/profile.json"))
print({k: v for k, v in s.items() if k not in ("streams", "host_calls", "long_calls")})
for k, v in list(s["streams"].items())[:5]:
    print(k, v["busy_ms_per_unit"], v["by_kind_ms"])
print("host_calls", json.dumps(s.get("host_calls"))[:1500])
print("long_calls", json.dumps(s.get("long_calls"))[:2500])
PY
rm -f $OUT/*.trace.json*
}

call2() {
# .whl/base: `scripts/baseline_pnsfw.sh archive 7c84f70 .whl/base` (round 9's code: one nvJPEG state per size)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
sh scripts/baseline_pnsfw.sh wrapper .whl/base /tmp/bin/pnsfw-base
python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
timeout 90 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py -p no:cacheprovider -W ignore 2>&1 | tail -3
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 230 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor --baseline /tmp/bin/pnsfw-base --ours-repeats 4 --out $OUT/thumbs_ab.json 2>&1 | grep -v '^\s*$' | tail -10
timeout 120 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor --ours-variants 'gpu-first-unit=cpu' '' --ours-repeats 2 --out $OUT/thumbs_first.json 2>&1 | grep -v '^\s*$' | tail -5
timeout 100 python3 $B --run-timeout 30 --thumbs 0 --photos 10000 --skip-anchor --ours-variants '' 'gpu-first-unit=cpu' --out $OUT/photos.json 2>&1 | grep -v '^\s*$' | tail -3
kill $DMON
stage_table $W/runs
python3 - <<'PY'
import json, glob, os
for f in ("thumbs_first.json", "photos.json"):
    d = json.load(open(os.environ["OUT"] + "/" + f))
    for corpus, runs in d["results"].items():
        for name, r in runs.items():
            print(corpus, name, [p for p in r.get("timeline", []) if p[0] > 2.5][:12])
PY
}

call3() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
timeout 170 python3 $B --run-timeout 30 --thumbs 100000 --photos 0 --skip-anchor --ours-variants '' 'gpu-first-unit=cpu' --ours-repeats 4 --out $OUT/thumbs_first.json 2>&1 | grep -v '^\s*$' | tail -9
timeout 80 python3 $B --run-timeout 25 --thumbs 0 --photos 10000 --skip-anchor --ours-variants 'gpu-first-unit=cpu' '' --ours-repeats 2 --out $OUT/photos_first.json 2>&1 | grep -v '^\s*$' | tail -5
python3 - <<'PY'
import json, os
for f in ("thumbs_first.json", "photos_first.json"):
    d = json.load(open(os.environ["OUT"] + "/" + f))
    for corpus, runs in d["results"].items():
        for name, r in runs.items():
            t = dict((p[1], p[0]) for p in r.get("timeline", []))
            print(corpus, name, "import", t.get("torch imported"), "tower", t.get("image tower ready"), "first", t.get("first batch encoded"), "after import", round(t.get("first batch encoded", 0) - t.get("torch imported", 0), 2))
PY
}

set -u; prep; "call$1"
