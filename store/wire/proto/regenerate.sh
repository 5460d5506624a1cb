#!/usr/bin/env bash
# Regenerate kvstore_pb2.py / kvstore_pb2_grpc.py from kvstore.proto (needs grpcio-tools,
# in the test extra). Run from anywhere; the output is committed.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. store/wire/proto/kvstore.proto
