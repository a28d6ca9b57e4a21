#!/usr/bin/env bash
# The GPU proof kit (bench/gpu_check.py) on a CUDA machine that has torch but not qtune's other dependencies and no
# network: wheels carried in .whl/ (README, "The GPU check") are installed into a scratch folder first.
#   bash bench/gpu_check.sh [--budget-s 480] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qtune-site .whl/*.whl
    export PYTHONPATH="/tmp/qtune-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 bench/gpu_check.py "$@"
