#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): every algorithm trains, resumes and evaluates with
# device=cuda defaults, vmap = loop on the GPU in float64, and MAML tasks/s per strategy and
# order. A few minutes on one GPU.
#
#   bash scripts/gpu_check.sh                 # on a CUDA machine
#   bash scripts/gpu_check.sh --device cpu    # the same checks on the CPU (a dry run)
#
# It installs the project into the active Python if it is not there. On a machine without a
# network, bring the pure-Python dependencies as wheels and install them first, e.g.
#   pip wheel --no-deps -w wheels hydra-core omegaconf antlr4-python3-runtime==4.9.3
#   python3 -m pip install --no-deps --no-index wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import metalearn.conf" 2>/dev/null; then
    python3 -m pip install -q -e . 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
fi
PYTHONUNBUFFERED=1 exec python3 scripts/gpu_check.py "$@"
