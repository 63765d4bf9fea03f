#!/usr/bin/env bash
# The GPU checks and benchmarks of issues 4 (FP8) and 5 (MoE), in one call of the device
# tool (a lent H100/H200: Python 3.12, torch 2.11, Triton 3.6, no internet, 10 minutes a
# command).
#
# 1. Here, once per checkout: megatron-core's cp312 wheel into .whl/ (git-ignored, 2.4 MB):
#      PYTHON=.venv/bin/python bash scripts/device_run.sh --fetch
# 2. The device tool's call (copy as is):
#      run(command="bash scripts/device_run.sh", carry=[".whl"], timeout_s=600)
# 3. What comes back in $OUT (7 files): run.log (all output), env.txt (GPU, driver,
#    versions), pytest_gpu.xml (tests/test_fp8_gpu.py and the benchmarks' smoke test on the
#    GPU; max relative errors as properties), pytest_multirank.xml (`make test-gpu`: the
#    multi-rank tests on NCCL; on one GPU those of more than one rank are skipped, saying
#    so), bench/results/gpu_fp8.json and gpu_moe.json
#    (each benchmark's tables, every timing, the machine and versions) and bench/results.md.
#    Here: copy the two JSON files into bench/results/, then `python -m bench --report-only`
#    regenerates bench/results.md with them.
#
# Steps run in order, each under a share of the time left, and a failing step does not stop
# the next: tests first (short), then gpu_fp8 (about 2 minutes expected), gpu_moe (about 1),
# then, if time is left, every other test marked `gpu`, then `make test-gpu`.
set -uo pipefail
cd "$(dirname "$0")/.."

MCORE="megatron-core==0.19.2"
if [ "${1:-}" = "--fetch" ]; then
  exec "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 -d .whl "$MCORE"
fi
: "${OUT:?run this on the device machine, whose OUT names the folder that comes back}"
exec > >(tee "$OUT/run.log") 2>&1
export TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-570}  # seconds of the command's 600 (or less), leaving time to return $OUT
START=$SECONDS

# step LABEL MAX_SECONDS CMD...: CMD under a timeout of MAX_SECONDS or the time left.
step() {
  local label=$1 max=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  echo "=== $label: $((SECONDS - START)) s in, limit ${limit} s"
  if [ "$limit" -le 5 ]; then echo "=== $label: skipped, no time left"; return; fi
  timeout --kill-after=10 "$limit" "$@"
  echo "=== $label: exit $? at $((SECONDS - START)) s"
}

{
  nvidia-smi
  python3 - <<'EOF'
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
print(torch.cuda.get_device_name(), "sm%d%d" % torch.cuda.get_device_capability(),
      torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
EOF
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|packaging|pytest) '
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

wheel=$(ls .whl/megatron_core-0.19.2-cp312-*.whl 2>/dev/null | head -1)
if [ -z "$wheel" ]; then
  echo "no megatron-core cp312 wheel in .whl/: run 'bash scripts/device_run.sh --fetch' here" \
    "and name .whl in the call's carry"
  exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$wheel" || exit 1
export PYTHONPATH="/tmp/site:$PWD"

step "GPU tests" 150 python3 -m pytest -p no:cacheprovider -q -rA --timeout=120 \
  --junitxml="$OUT/pytest_gpu.xml" tests/test_fp8_gpu.py tests/test_bench_gpu_smoke.py
step "gpu_fp8" 240 python3 -m bench gpu_fp8 --out "$OUT/bench"
step "gpu_moe" 150 python3 -m bench gpu_moe --out "$OUT/bench"
# Other tests marked gpu (e.g. NCCL all-reduce); modules that fail to import on the
# device's packages are reported and skipped.
step "other gpu tests" 90 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu \
  --continue-on-collection-errors --timeout=60 tests --ignore=tests/test_fp8_gpu.py \
  --ignore=tests/test_bench_gpu_smoke.py
# The multi-rank tests on NCCL, one GPU per rank (README "Parallel tests on a multi-GPU
# CI"); `-o setup`: the packages are installed above, there is no .venv here.
if command -v make >/dev/null; then
  step "make test-gpu" 150 make -o setup test-gpu PY=python3 \
    ARGS="-p no:cacheprovider --junitxml=$OUT/pytest_multirank.xml"
else  # the same command as the Makefile's test-gpu
  step "make test-gpu (no make here)" 150 env MEGASEEK_TEST_BACKEND=nccl python3 -m pytest \
    -m multirank --timeout=900 -rs tests -p no:cacheprovider \
    --junitxml="$OUT/pytest_multirank.xml"
fi
echo "=== done at $((SECONDS - START)) s"
