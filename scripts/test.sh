#!/usr/bin/env bash
# Set up everything the tests need (venv, Chromium for the page test) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
export KERAS_BACKEND=${KERAS_BACKEND:-tensorflow} TF_CPP_MIN_LOG_LEVEL=3
# the lint gate first: style (ruff) and types (mypy, config in pyproject.toml) fail the run like a test
.venv/bin/ruff check pnsfw tests scripts
.venv/bin/mypy pnsfw
# two workers, each test file on one of them (its module fixtures and servers stay in one process): the suite
# spends much of its time waiting on the subprocesses it starts, so two files at a time fit 2 cores
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
