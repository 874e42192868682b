#!/bin/bash
# from main's copy on the device: after = .whl/imp6 (branch imp6), before = .whl/imp6/before (imp6 at 2e324f2)
set -o pipefail
NEW=$PWD/.whl/imp6; OLD=$NEW/before; B=$NEW/scripts/bench_import.py; W=/dev/shm/bi
mkdir -p /tmp/r; nproc; nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, numpy, pyarrow; print(torch.__version__, numpy.__version__, pyarrow.__version__)"
run() { local tag=$1 path=$2 limit=$3; shift 3; echo "== $tag $(date +%T)"; PYTHONPATH=$path timeout $limit python3 $B --rows 2000000 --folder $W --keep-folder --out /tmp/r/$tag.json "$@" 2>&1 | grep -v Warning | tail -3; }
run after_cold $NEW 90
run before_cold $OLD 40
run after_cold_2 $NEW 40
run after_warm $NEW 40 --warm
run before_warm $OLD 40 --warm
run after_warm_2 $NEW 40 --warm
run after_score $NEW 100 --score --device cuda --score-runs 3
python3 - <<'PY'
import json, glob, os
out = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob("/tmp/r/*.json"))}
json.dump(out, open(os.environ["OUT"] + "/bench_import_h200_session8_imp6.json", "w"), indent=1)
PY
