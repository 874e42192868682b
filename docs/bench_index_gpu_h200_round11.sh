# GPU indexing, round 11: the device calls, run from the repo root on the H200 machine with the wheels of
# round 7 in .whl/ (clip-anytorch 2.6.0, ftfy 6.3.1, wcwidth 0.2.13, clip-retrieval 2.45.0, all_clip 1.3.0, fire
# 0.7.1, termcolor 3.3.0, braceexpand 0.1.7, webdataset 0.2.111). Each call: bash this-file N [VARIANT]
# (prep, then callN). Call 1 runs --gpu-sm-decoders (nvJPEG's GPU_HYBRID backend beside the engines) and
# --gpu-decoder sm (that backend alone) for the first time, in the probe and alternating in the pipeline, with
# round 9's --gpu-resize encoder beside them; call 2 takes the winner (VARIANT, e.g. gpu-sm-decoders=1) to 1M
# thumbnails and clip-retrieval's 100k; call 3 (no VARIANT) the anchor again and three variants at 1M; call 4
# the new default against the old.

. scripts/gpu_bench_prep.sh  # prep(), stage_table()

startup_imports() {
# what the 0.4-0.7 s before "pnsfw index started" is: the interpreter, site, and pnsfw's imports
for i in 1 2; do /usr/bin/time -f "python3 -c pass %e s" python3 -c pass; done
for i in 1 2; do /usr/bin/time -f "import pnsfw.cli + pipeline %e s" python3 -c "import pnsfw.cli, pnsfw.indexer.pipeline"; done
for i in 1 2; do /usr/bin/time -f "import torch %e s" python3 -c "import torch"; done
python3 -X importtime -c "import pnsfw.cli, pnsfw.indexer.pipeline" 2>&1 | awk -F'|' 'NR>1 {print $2 "|" $3}' | sort -n | tail -12
}

call1() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
t0=$(date +%s); python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1; echo "corpora $(( $(date +%s) - t0 )) s"
timeout 100 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py -p no:cacheprovider -W ignore 2>&1 | tail -4
startup_imports 2>&1 | tail -20
timeout 150 python3 scripts/probe_nvjpeg_photos.py $W/thumbs --model $W/vit-b-32-seed0.pt --calls 20 --out $OUT/probe.json \
    --only alone alone_gpu_hybrid beside_graph_tower_own_stream beside_graph_tower_own_stream_gpu_hybrid \
    --profile alone_gpu_hybrid 2>&1 | grep -v Warning | cut -c1-1500 | tail -8
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 360 python3 $B --run-timeout 40 --thumbs 100000 --photos 0 --skip-anchor \
    --ours-variants '' 'gpu-sm-decoders=1' 'gpu-sm-decoders=2' 'gpu-decoder=sm' 'gpu-resize=encoder' --ours-repeats 2 \
    --out $OUT/thumbs.json 2>&1 | grep -v '^\s*$' | tail -10
kill $DMON
stage_table $W/runs
grep -h "GPU path:" $W/runs/*.log | sort | uniq -c | head -5
}

call2() {
V=${2:?call 2 takes the variant that won call 1, e.g. gpu-sm-decoders=1}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 $B --thumbs 100000 --photos 10000 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 200 python3 $B --run-timeout 60 --thumbs 100000 --photos 0 --ours-variants '' "$V" --out $OUT/thumbs_anchor.json 2>&1 | grep -v '^\s*$' | tail -5
timeout 90 python3 $B --run-timeout 30 --thumbs 0 --photos 10000 --skip-anchor --ours-variants '' "$V" --out $OUT/photos.json 2>&1 | grep -v '^\s*$' | tail -3
timeout 200 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 110 --thumbs 1000000 --photos 0 --skip-anchor --ours-variants "$V" --out $OUT/thumbs_1m.json 2>&1 | grep -v '^\s*$' | tail -2
kill $DMON
stage_table $W/runs
}

call3() {
# call 2's anchor ran under a 60 s limit (clip-retrieval takes ~85 s): again with 150 s; and at 1M, where call 2's
# SM decoders gained nothing, the encoder's loop accounted in full (poll_s, encoder_s) and the tower's stream
# above the SM decoders' (--gpu-decode-priority low), or the CPU workers decoding a share of each unit (the GPU is
# the bound with the SM decoders: 100 % busy, the encoder waiting 24 s of 61 for the tower's features)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
timeout 60 python3 -m pytest -q -rf tests/test_gpu_path.py -k "priority or handed_out" -p no:cacheprovider -W ignore 2>&1 | tail -2
nvidia-smi dmon -s u -d 1 > $OUT/dmon.txt 2>&1 & DMON=$!
timeout 260 python3 $B --run-timeout 150 --thumbs 100000 --photos 0 --ours-variants '' 'gpu-decoder=sm' \
    --out $OUT/thumbs_anchor.json 2>&1 | grep -v '^\s*$' | tail -4
timeout 330 python3 $B --workdir /tmp/pnsfw-1m --run-timeout 110 --thumbs 1000000 --photos 0 --skip-anchor \
    --ours-variants 'gpu-decoder=sm' 'gpu-decoder=sm gpu-decode-priority=low' 'gpu-decoder=sm gpu-cpu-share=-1' \
    --out $OUT/thumbs_1m.json 2>&1 \
    | grep -v '^\s*$' | tail -4
kill $DMON
stage_table $W/runs; stage_table /tmp/pnsfw-1m/runs
}

call4() {
# the new default (auto: thumbnails' padded units on the SMs, large images on the engines) against the old one
# (--gpu-decoder engines), in turn, each pair's figures written as it ends; the GPU tests last. Photos are not
# run: on an H200 auto gives them the same four engine threads and gates as engines did.
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out $OUT/corpora.json | tail -1
timeout 60 python3 $B --run-timeout 25 --thumbs 100000 --photos 0 --skip-anchor --ours-variants '' 'gpu-decoder=engines' \
    --out $OUT/thumbs1.json 2>&1 | grep -v '^\s*$' | tail -2
timeout 60 python3 $B --run-timeout 25 --thumbs 100000 --photos 0 --skip-anchor --ours-variants 'gpu-decoder=engines' '' \
    --out $OUT/thumbs2.json 2>&1 | grep -v '^\s*$' | tail -2
stage_table $W/runs
timeout 60 python3 -m pytest -q -rf tests/test_gpu_nvjpeg.py tests/test_gpu_path.py -p no:cacheprovider -W ignore 2>&1 | tail -3
}

set -u; prep; "call$1" "$@"
