#!/bin/bash
# from the repo root of main's copy: before = branch lead's pnsfw (.whl/imp5/before), after = .whl/imp5 (branch imp5, final)
set -o pipefail
ROOT=$PWD; NEW=$ROOT/.whl/imp5; OLD=$NEW/before; B=$NEW/scripts/bench_import.py; W=/dev/shm/bi
mkdir -p /tmp/r; nproc
run() { local tag=$1 path=$2 limit=$3; shift 3; echo "== $tag $(date +%T)"; PYTHONPATH=$path timeout $limit python3 $B --rows 2000000 --folder $W --keep-folder --out /tmp/r/$tag.json "$@" 2>&1 | grep -v Warning | tail -2; }
run after_warm $NEW 70 --warm
run before_warm $OLD 30 --warm
run after_warm_2 $NEW 30 --warm
run before_warm_2 $OLD 30 --warm
run after_warm_lanes32k $NEW 30 --warm --lanes 32768
run after_warm_lanes32k_map8 $NEW 30 --warm --lanes 32768 --map-threads 8
run after_warm_map8 $NEW 30 --warm --map-threads 8
run after_warm_lanes64k $NEW 30 --warm --lanes 65536
run after_cold $NEW 30
run before_cold $OLD 30
echo "== urihash $(date +%T)"; PYTHONPATH=$NEW timeout 30 python3 $NEW/scripts/bench_urihash.py --columns 4 --threads 1,4,8 --lanes 16384,32768,65536 --out /tmp/r/urihash.json
python3 - <<'PY'
import json, glob, os
out = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob("/tmp/r/*.json"))}
json.dump(out, open(os.environ["OUT"] + "/bench_import_h200_round4_run2.json", "w"), indent=1)
PY
