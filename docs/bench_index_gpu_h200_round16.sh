# GPU indexing, round 16: the device calls, run from the repo root on the GPU machine with the wheels of round 13
# in .whl/ (as round 15's header lists) and .whl/base = 568c811's code (round 15's; sh scripts/baseline_pnsfw.sh
# archive 568c811 .whl/base). Each call: bash this-file N, with carry [".whl"]; $OUT returns at most 8 files.
# Round 15's probes (568c811, bytecode compiled: first batch 4.14 / 4.28 s on an H100) found three things
# beside the first batch: the writer's first number column imported pandas (pyarrow's to_pandas_dtype on the
# device image); the nvJPEG handles made ahead came after the decoders had made their own (the first decode
# ahead held them back); the stand-in tower was warmed after the run's own (1.2 s later, beside the first batch);
# and the first batch (256 images, eager) took 0.37-0.41 s beside the decode threads. Now: the decoders wait for
# the handles made ahead (oldest first, the first with a state for the first unit's batch; the first decode
# ahead only before any decoder came); no stand-in once
# the run's own warm-up began; numpy dtypes from our own table; the first unit's batch replayed from a CUDA
# graph captured at the warm-up.
# Call 1: the GPU tests; with the bytecode compiled two probes of ours, then ours and 568c811 paired at 100k
# (three pairs: the first batch and e2e); one probe as lent.
# Call 2: 1M paired with 568c811 as lent (one pair), the stage table; the anchor at 100k.
# Call 3 (what the device time left after failed starts allows, ~450 s): call 1 with two pairs, the tower's
# variants alone (CLIP's QuickGELU as one SiLU or as three kernels: scripts/bench_gpu_stages.py), the anchor
# with the bytecode compiled for both tools (clip-retrieval's wheels are in /tmp/site, which precompile covers),
# then 1M paired as lent if the call is still under 290 s; the probes in one archive.

. scripts/gpu_bench_prep.sh  # prep(), stage_table() and the steps

start() {  # the GPU tests, the 100k corpus, the bytecode compiled, two probes of ours with it
gpu; python3 -c "import pyarrow, torch; print('pyarrow', pyarrow.__version__, 'torch', torch.__version__)"
gpu_tests; corpus_100k
precompile
PYTHONPYCACHEPREFIX=/tmp/pyc probe pyc_1; PYTHONPYCACHEPREFIX=/tmp/pyc probe pyc_2
}

call1() {
start
PYTHONPYCACHEPREFIX=/tmp/pyc pair_100k 3 thumbs_100k_pyc
probe lent_1
}

call2() {
gpu; corpus_1m
pair_1m 1 thumbs_1m_lent 150
stage_table /tmp/pnsfw-1m/runs > $OUT/stages_1m_lent.txt
anchor 1
}

call3() {
start
PYTHONPYCACHEPREFIX=/tmp/pyc pair_100k 2 thumbs_100k_pyc
tower_stages stages_alone
probe lent_1
(cd $OUT && tar czf probes.tgz probe_* && rm probe_*)
PYTHONPYCACHEPREFIX=/tmp/pyc anchor 1  # both tools with their bytecode, as pip installs leave them
echo "at ${SECONDS} s"
if [ $SECONDS -lt 290 ]; then
  corpus_1m; pair_1m 1 thumbs_1m_lent 150; stage_table /tmp/pnsfw-1m/runs > $OUT/stages_1m_lent.txt
fi
}

set -u; prep; "call$1" "$@"
