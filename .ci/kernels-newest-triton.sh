#!/usr/bin/env bash
# CI, second environment: the kernels on the newest supported triton (3.9.0); .ci/run covers the oldest (3.6.0).
# A virtual environment of its own (.venv39), the tests that run kernels in Triton's interpreter (and their compiled-PTX
# checks), then every kernel's covering set of variants compiled for sm_80, sm_90 and sm_100.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv39
. .venv39/bin/activate
pip install -q torch==2.13.0 triton==3.9.0 -e '.[test]'
python -c 'import triton; assert triton.__version__ == "3.9.0", triton.__version__'
python -m pytest -q tests/test_kernels.py tests/test_threshold.py tests/test_kernels_compile.py \
  tests/test_autograd.py tests/test_production.py tests/test_plan.py
python -m fastddim.kernels.compile_check --quiet
