#!/bin/bash
# from the repo root of main's copy: before = branch lead's pnsfw (.whl/imp5/before), after = .whl/imp5 (branch imp5)
set -o pipefail
ROOT=$PWD; NEW=$ROOT/.whl/imp5; OLD=$NEW/before; B=$NEW/scripts/bench_import.py; W=/dev/shm/bi
mkdir -p /tmp/r; nproc; python3 -c "import torch, pyarrow, numpy, sys; print(sys.version.split()[0], torch.__version__, pyarrow.__version__, numpy.__version__)"
lscpu | grep -i "model name\|L2\|L3" | cat
run() { local tag=$1 path=$2; shift 2; echo "== $tag $(date +%T)"; PYTHONPATH=$path timeout 45 python3 $B --rows 2000000 --folder $W --keep-folder --out /tmp/r/$tag.json "$@" 2>&1 | grep -v Warning | tail -12; }
run after_warm $NEW --warm
run before_warm $OLD --warm
run after_warm_2 $NEW --warm
run before_warm_2 $OLD --warm
run after_cold $NEW
run before_cold $OLD
run after_warm_hashlib $NEW --warm --hash hashlib
run after_warm_map8 $NEW --warm --map-threads 8
run after_warm_map3 $NEW --warm --map-threads 3
run after_warm_lanes4096 $NEW --warm --lanes 4096
echo "== urihash $(date +%T)"; PYTHONPATH=$NEW timeout 40 python3 $NEW/scripts/bench_urihash.py --columns 4 --threads 1,4,8 --out /tmp/r/urihash.json
run after_stages $NEW --stages
python3 - <<'PY'
import json, glob, os
out = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob("/tmp/r/*.json"))}
json.dump(out, open(os.environ["OUT"] + "/bench_import_h200_round4_run1.json", "w"), indent=1)
PY
