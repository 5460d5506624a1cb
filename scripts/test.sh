#!/usr/bin/env bash
# Install what the tests need on a clean machine (Debian's redis-server, the CPU build of
# torch, the project with its test extra), then run the default (CPU-only) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
# KVSTORE_TEST_UCX=1 also installs the ucx extra (ucxx-cu12: ~70 MB of wheels, ~250 MB
# installed), so tests/test_ucx_transport.py runs instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools >/dev/null
fi
python3 -m pip install -q torch==2.13.0
extras=test
if [ "${KVSTORE_TEST_UCX:-0}" = 1 ]; then extras=test,ucx; fi
python3 -m pip install -q -e ".[$extras]"
exec python3 -m pytest -q "$@"
