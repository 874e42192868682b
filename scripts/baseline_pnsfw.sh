#!/bin/sh
# A pnsfw command that runs an older commit's code, for `scripts/bench_index.py --baseline`:
#   scripts/baseline_pnsfw.sh archive REV DIR   in a git checkout: DIR/pnsfw/ becomes REV's package
#   scripts/baseline_pnsfw.sh wrapper DIR OUT   anywhere (a GPU machine given DIR): OUT runs DIR's pnsfw with
#                                               this shell's python3 (or $PYTHON) and its PYTHONPATH after DIR
# `python -P` keeps the working directory (a checkout's own pnsfw/) off the path.
set -eu
case "${1:-}" in
archive)
    rm -rf "$3/pnsfw" && mkdir -p "$3" && git archive "$2" pnsfw | tar -x -C "$3" ;;
wrapper)
    dir=$(cd "$2" && pwd)
    python=$(command -v "${PYTHON:-python3}")
    python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"  # absolute, not resolved (venvs)
    printf '#!/bin/sh\nPYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH} exec %s -P -c "import sys; from pnsfw.cli import main; sys.argv[0] = \\"pnsfw\\"; main()" "$@"\n' \
        "$dir" "$python" > "$3"
    chmod +x "$3" ;;
*)
    echo "usage: $0 archive REV DIR | wrapper DIR OUT" >&2; exit 2 ;;
esac
