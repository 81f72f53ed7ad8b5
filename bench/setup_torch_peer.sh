#!/usr/bin/env bash
# Installs what bench/torch_peer.py (the PyTorch peer of bench/engine_bench)
# needs into a virtual environment at the repository root, .venv-bench/:
# torch and numpy from PyPI. Does nothing more when torch already imports there.
#
#   bench/setup_torch_peer.sh
#   .venv-bench/bin/python bench/torch_peer.py [--filter 'mixtral_like/bf16'] [--min_time 2]
#
# Environment: PYTHON (the interpreter that creates the venv, default python3),
# MOE_BENCH_VENV (another venv path).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOE_BENCH_VENV:-$root/.venv-bench}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "creating $venv"
  "$python" -m venv "$venv"
fi

if "$venv/bin/python" -c 'import torch, numpy' 2>/dev/null; then
  echo "torch already installed in $venv"
else
  # Plain PyPI: on x86-64 Linux its torch wheel is the CUDA build and brings
  # the nvidia-* wheels with it (a few GB); the peer uses only its CPU code.
  "$venv/bin/python" -m pip install --upgrade pip
  "$venv/bin/python" -m pip install torch numpy
fi

"$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "cpu capability", torch.backends.cpu.get_cpu_capability())'
