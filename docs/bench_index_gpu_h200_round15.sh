# GPU indexing, round 15: the device calls, run from the repo root on the H200 machine with the wheels of
# round 13 in .whl/ (clip-anytorch 2.6.0, ftfy 6.3.1, wcwidth 0.2.13, clip-retrieval 2.45.0, all_clip 1.3.0, fire
# 0.7.1, termcolor 3.3.0, braceexpand 0.1.7, webdataset 0.2.111, threadpoolctl 3.8.0) and .whl/base (498df1c's
# code: sh scripts/baseline_pnsfw.sh archive 498df1c .whl/base). Each call: bash this-file N (prep, then callN),
# with carry [".whl"]. $OUT returns at most 8 files: each call writes fewer.
# Call 1: where the start-up goes now, on 498df1c's code: two 100k runs under scripts/probe_startup.py as the
# image is lent (PYTHONDONTWRITEBYTECODE=1, no bytecode anywhere: every process compiles every module it
# imports), then two with every module's bytecode compiled beforehand, as a pip install leaves it.
# Call 1 ran on an H100 (the H200s did not come). Found, with the bytecode compiled (first batch 4.51 / 5.41 s;
# as lent 9.02 / 7.14): torch imported at 2.36 / 2.85 s; then on the main thread the fast tower's construction
# (deepcopy of the fp32 blocks, then .to(fp16)) 0.53 s, its warm-up forward 0.77 s, the first batch 0.45 s;
# the first unit's decode 0.92 s after its read, its nvJPEG calls 0.45-0.8 s each (first use), beside
# torchvision's fallback decoder being made (1.07 s); pandas imported by pyarrow's first pa.array on the
# writer thread (2.26 s, beside the first batches).
# Call 2: ours (the writer builds its columns without pa.array, so pandas is never imported; the tower's weights
# converted in one pass; no torchvision decoder made ahead; nvJPEG's first
# decode and a stand-in tower's warm-up on the CUDA context's thread) under the probe, as lent and compiled;
# the GPU tests; the anchor at 100k (as lent), with 498df1c beside ours.
# Call 3: ours against 498df1c at 1M, paired, as lent and with the bytecode compiled.
# Call 4 (the device time left after the tries for a machine that did not come: calls 2 and 3 in one): the GPU
# tests; one probe as lent and one compiled (100k); 1M paired with 498df1c, as lent; the anchor at 100k.
# Call 5 (what 329 s of device time allows): the GPU tests, then one probe as lent and one compiled (100k).

. scripts/gpu_bench_prep.sh  # prep(), stage_table() and the steps (gpu, probe, precompile, pair_1m, anchor, ...)

call1() {
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
python3 $B --thumbs 100000 --photos 0 --skip-anchor --skip-ours --out /tmp/corpora.json | tail -1
sync
probe lent_1; probe lent_2
precompile
export PYTHONPYCACHEPREFIX=/tmp/pyc
probe pyc_1; probe pyc_2
}

call2() {
gpu; corpus_100k; gpu_tests
probe lent_1
precompile
PYTHONPYCACHEPREFIX=/tmp/pyc probe pyc_1; PYTHONPYCACHEPREFIX=/tmp/pyc probe pyc_2
sh scripts/baseline_pnsfw.sh wrapper .whl/base /tmp/bin/pnsfw-base
anchor 2 --baseline /tmp/bin/pnsfw-base
}

call3() {
gpu; corpus_1m
pair_1m 2 thumbs_1m_lent 280
stage_table /tmp/pnsfw-1m/runs > $OUT/stages_1m_lent.txt
precompile
PYTHONPYCACHEPREFIX=/tmp/pyc pair_1m 1 thumbs_1m_pyc 150
}

call5() {
gpu; gpu_tests; corpus_100k
probe lent_1
precompile
PYTHONPYCACHEPREFIX=/tmp/pyc probe pyc_1
}

call4() {
call5
corpus_1m
pair_1m 1 thumbs_1m_lent 150
stage_table /tmp/pnsfw-1m/runs > $OUT/stages_1m_lent.txt
anchor 1
}

call6() {  # call 4 after call 5 on the same warm machine: a second compiled probe, 1M paired, the anchor
gpu; PYTHONPYCACHEPREFIX=/tmp/pyc probe pyc_2
corpus_1m
pair_1m 1 thumbs_1m_lent 150
stage_table /tmp/pnsfw-1m/runs > $OUT/stages_1m_lent.txt
anchor 1
}

set -u; prep; "call$1" "$@"
