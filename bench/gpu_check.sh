#!/usr/bin/env bash
# fastddim on a lent GPU, in one call: install the checkout, benchmark, run the test suite; everything under $OUT.
#
# Prepare here (once; .gpu-wheels is git-ignored):
#   bash ../shared/tools/gpu-wheels.sh .gpu-wheels     # diffusers==0.42.1 and the two small packages it needs there
# Then, through the device tool, from the repository root:
#   run(command="bash bench/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=480)
# The script keeps itself within BUDGET seconds (default 420: with a machine's start, about 9 of a session's 15
# device minutes, leaving room for one shorter rerun, e.g. BUDGET=200 PYTEST_ARGS="tests/test_kernels.py").
# Every step runs under `timeout`, the benchmark first (its numbers are the point of a GPU session), the tests
# in what is left.
# Back under $OUT (the device tool returns at most 8 files): summary.txt (with the direct-launch and compile-op
# checks' output), install.log, bench.log (both benchmarks' output), bench.json, bench.md, pipeline.json, pipeline.md, tests.log.
# Keep the benchmarks: copy bench.json|md to bench/results/<device.short>.json|md (device.short is in bench.json)
# and pipeline.json|md to bench/results/<device.short>-pipeline.json|md, and commit them. The script exits non-zero if any step failed or ran out of time.
#
# The GPU machine: Python 3.12 with torch 2.11 (CUDA), triton 3.6, pytest, pytest-benchmark, hypothesis, scipy,
# no network. Nothing here changes the card's settings.
set -uo pipefail

OUT=${OUT:-/tmp/fastddim-gpu-check}
BUDGET=${BUDGET:-420}
BENCH_LIMIT=${BENCH_LIMIT:-150}
PIPELINE_LIMIT=${PIPELINE_LIMIT:-120}
# PIPELINE_ARGS: extra arguments of bench/pipeline.py, e.g. "--no-compile" (compiling SD 1.5's UNet takes minutes).
PIPELINE_ARGS=${PIPELINE_ARGS:---no-compile}
PYTHON=${PYTHON:-python3}
# PYTEST_ARGS: extra pytest arguments (word-split), e.g. "tests/test_kernels.py -x" for a shorter run.
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
status=0

note() { echo "$*" | tee -a "$summary"; }
left() { echo $((BUDGET - SECONDS)); }
# step NAME LOG LIMIT COMMAND...: run COMMAND under `timeout LIMIT`, its output in LOG; note how it ended.
step() {
  local name=$1 log=$2 limit=$3 rc
  shift 3
  if ((limit < 10)); then
    note "$name: SKIPPED (${limit}s of the budget left)"
    status=1
    return 1
  fi
  local began=$SECONDS
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  if ((rc == 124 || rc == 137)); then
    note "$name: TIMED OUT after ${limit}s (log: $(basename "$log"))"
  elif ((rc != 0)); then
    note "$name: FAILED, exit $rc, $((SECONDS - began))s (log: $(basename "$log"))"
  else
    note "$name: ok, $((SECONDS - began))s"
  fi
  ((rc == 0)) || status=1
  return "$rc"
}

note "== fastddim GPU check, $(date -u +%FT%TZ), budget ${BUDGET}s"
# The device machine gets a copy of the working tree, maybe without .git: a hash of the sources names the code.
git_state() {
  local rev
  rev=$(git rev-parse --short HEAD 2>/dev/null) || { echo "no .git"; return; }
  git diff --quiet HEAD 2>/dev/null && echo "$rev" || echo "$rev + uncommitted changes"
}
note "sources: sha1 $(find fastddim kernels -name '*.py' | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12)" \
  "(git: $(git_state))"
note "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"

# Install: the diffusers wheels beside the image's packages (PYTHONPATH), the project editable into the image's
# environment (no build isolation: nothing can be downloaded there). fastddim.kernels lives in kernels/, so the
# package must be installed, not merely put on the path.
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  step "install diffusers wheels" "$OUT/install.log" 120 \
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  note "install diffusers wheels: SKIPPED, no .gpu-wheels/*.whl carried: diffusers comparisons and tests will be skipped"
  status=1
fi
before=$status
if ! step "install fastddim" "$OUT/install-fastddim.log" 180 \
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .; then
  # Without a usable build backend there: import from the tree, with fastddim.kernels as a link to kernels/
  # (in that machine's copy of the tree only; the `fastddim` console script is then missing).
  [ -e fastddim/kernels ] || ln -s ../kernels fastddim/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  note "install fastddim: using PYTHONPATH=$PWD with fastddim/kernels -> ../kernels instead"
  status=$before
fi
cat "$OUT/install-fastddim.tmp" >>"$OUT/install.log" 2>/dev/null; rm -f "$OUT/install-fastddim.tmp"

# The GPU path: real Triton kernels, never the interpreter, on the automatic backend choice.
unset TRITON_INTERPRET FASTDDIM_BACKEND
export PYTHONUNBUFFERED=1
"$PYTHON" - 2>&1 <<'EOF' | tee -a "$summary" || { note "environment check: FAILED (see above)"; status=1; }
import torch, triton
import fastddim
from fastddim import ops
try:
    import diffusers
    diffusers_version = diffusers.__version__
except ImportError:
    diffusers_version = None
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"diffusers {diffusers_version}, fastddim {fastddim.__version__} from {fastddim.__file__}, "
      f"kernels: {ops.triton_available()}")
assert torch.cuda.is_available(), "torch sees no CUDA device"
backend = ops.select_backend(torch.device("cuda"))
print(f"backend on cuda: {backend}; interpreted: {ops.triton_interpreting()}")
assert backend == "triton" and not ops.triton_interpreting()
EOF

# The direct launcher (kernels/launch.py) first: it must give the JIT launch's bits before any timing counts.
if step "direct launch check" "$OUT/direct.log" 90 "$PYTHON" bench/direct_launch_check.py; then
  note "$(tail -n 20 "$OUT/direct.log")"
else
  note "$(tail -n 40 "$OUT/direct.log")"
fi
rm -f "$OUT/direct.log"

bench_limit=$(( $(left) - 120 < BENCH_LIMIT ? $(left) - 120 : BENCH_LIMIT ))
if step "benchmark" "$OUT/bench.log" "$bench_limit" "$PYTHON" bench/run.py --out "$OUT/bench.json"; then
  note "$(grep -E '^(\||Acceptance)' "$OUT/bench.md")"
fi

# How torch.compile should launch the kernel: the custom op against a triton_op (bits, recompiles, host time).
if step "compile op check" "$OUT/compile_op.log" "$(( $(left) - 150 < 100 ? $(left) - 150 : 100 ))" \
  "$PYTHON" bench/compile_op_check.py; then
  note "$(tail -n 12 "$OUT/compile_op.log")"
else
  note "$(tail -n 30 "$OUT/compile_op.log")"
fi
rm -f "$OUT/compile_op.log"

pipeline_limit=$(( $(left) - 90 < PIPELINE_LIMIT ? $(left) - 90 : PIPELINE_LIMIT ))
if step "pipeline benchmark" "$OUT/pipeline.log" "$pipeline_limit" \
  "$PYTHON" bench/pipeline.py --out "$OUT/pipeline.json" ${PIPELINE_ARGS}; then
  note "$(grep -E '^\|' "$OUT/pipeline.md")"
fi
cat "$OUT/pipeline.log" >>"$OUT/bench.log" 2>/dev/null; rm -f "$OUT/pipeline.log"

step "tests" "$OUT/tests.log" "$(( $(left) - 15 ))" \
  "$PYTHON" -m pytest -q -p no:cacheprovider -rfE --durations=25 ${PYTEST_ARGS:-}
note "tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$OUT/tests.log" | tail -n 1)"

note "== done in ${SECONDS}s, status $status"
exit "$status"
