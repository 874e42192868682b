#!/usr/bin/env bash
# The main job on a small sample: set up, make a labelled sample, index -> train -> score -> search -> serve.
# CLIP ViT-B/32 is used by name (downloaded once); offline, set PNSFW_MODEL=/path/to/checkpoint.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KERAS_BACKEND=${KERAS_BACKEND:-tensorflow} TF_CPP_MIN_LOG_LEVEL=3
PNSFW=.venv/bin/pnsfw
STORE=${PNSFW_STORE:-sample/store}
MODEL=${PNSFW_MODEL:-ViT-B/32}
[ -d sample/dataset ] || .venv/bin/python scripts/make_sample.py sample/dataset --per-class 60 >/dev/null
# the demo's own store from an earlier run with another CLIP model: start it again (a store keeps one model)
if [ -z "${PNSFW_STORE:-}" ] && [ -d "$STORE" ] && info=$($PNSFW info --store "$STORE" --json 2>/dev/null) \
    && ! .venv/bin/python -c '
import json, os, sys
name = (json.loads(sys.argv[1])["space"] or {}).get("encoder")
sys.exit(name != (os.path.abspath(sys.argv[2]) if os.path.isfile(sys.argv[2]) else sys.argv[2]))' \
    "$info" "$MODEL"; then
    echo "== $STORE was built with another CLIP model: starting it again"
    rm -rf "$STORE"
fi

echo "== index"
$PNSFW index sample/dataset --store "$STORE" --model "$MODEL"
echo "== train"
$PNSFW train --store "$STORE" --labels folders --name demo --epochs 20
echo "== score"
$PNSFW score --store "$STORE" --model demo
$PNSFW filter --store "$STORE" --model demo --keep safe --out sample/safe.csv
echo "== search (by the first image, by text)"
first=$(ls sample/dataset/sfw | head -1)
$PNSFW search --store "$STORE" --model demo --image "sample/dataset/sfw/$first" -k 5 --clip-model "$MODEL"
$PNSFW search --store "$STORE" --model demo --text "a cat" -k 3 --clip-model "$MODEL"
$PNSFW explain --store "$STORE" --model demo --id 0 -k 5
echo "== serve (a few requests, then stop)"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$PNSFW serve --store "$STORE" --model demo --port "$port" --clip-model "$MODEL" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
curl -sf -F "image=@sample/dataset/nsfw/$(ls sample/dataset/nsfw | head -1)" "http://127.0.0.1:$port/v1/score"; echo
curl -sf -H 'content-type: application/json' -d '{"id": 0, "k": 3}' "http://127.0.0.1:$port/v1/search"; echo
echo "audit page: http://127.0.0.1:$port/ (stopped now; run \`$PNSFW serve --store $STORE --model demo\` to keep it)"
