#!/usr/bin/env bash
# The device checks in one call (a CUDA machine with no network): the gpu-marked tests,
# the default engine/connector tests with the engine on CUDA (device auto), and the
# engine throughput benchmark on CUDA. Wheels the image lacks travel in .whl/ (git-ignored
# locally): cbor2, redis, kvikio-cu13, libkvikio-cu13, rapids-logger for Python 3.12, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     cbor2 redis kvikio-cu13 libkvikio-cu13 'rapids-logger==0.3.*'
# Results go to $OUT (or ./gpu-out).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "=== gpu-marked tests"
timeout 200 python3 -m pytest -p no:cacheprovider -q -m gpu tests/ -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -20
echo "=== engine and connector tests with the engine on CUDA (no redis server there: those skip)"
timeout 200 python3 -m pytest -p no:cacheprovider -q tests/test_hf_equivalence.py tests/test_engine_api.py \
    tests/test_connector_tiered.py tests/test_connector_faults.py -k "not cli" 2>&1 \
    | tee "$OUT/cuda_auto_tests.log" | tail -20
echo "=== engine throughput on CUDA"
timeout 150 python3 benchmarks/engine_throughput.py --device cuda --modes engine,hf --hf-batch-sizes 16,64 \
    --json "$OUT/engine_throughput_cuda.json" 2>&1 | tail -12
