#!/usr/bin/env bash
# Install what the tests need on a clean machine (Debian's redis-server, the CPU build of
# torch, the project with its test extra), then run the default (CPU-only) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
# The ucx extra (ucxx-cu12: ~70 MB of wheels, ~250 MB installed) comes too, so
# tests/test_ucx_transport.py runs; KVSTORE_TEST_UCX=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools >/dev/null
fi
python3 -m pip install -q torch==2.13.0
# (ucxx-cu12 needs no GPU to import and talk TCP.)
extras=test,ucx
if [ "${KVSTORE_TEST_UCX:-1}" = 0 ]; then extras=test; fi
python3 -m pip install -q -e ".[$extras]"
exec python3 -m pytest -q "$@"
