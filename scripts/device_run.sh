#!/usr/bin/env bash
# Every GPU figure of issue 22 (FP8 that pays on Hopper), with the quick GPU tests, in ONE
# call of the device tool of at most 8 minutes (a lent H100/H200: Python 3.12, torch 2.11,
# Triton 3.6, no internet).
#
# How the next session runs it:
# 1. Here, once per checkout (the checkout the session started in: the device call sends
#    that one): megatron-core's cp312 wheel into .whl/ (git-ignored, 2.4 MB):
#      PYTHON=.venv/bin/python bash scripts/device_run.sh --fetch
# 2. The device tool's call (copy as is; 480 s leaves the 460 s budget below its margin):
#      run(command="bash scripts/device_run.sh", carry=[".whl"], timeout_s=480)
#    A session with more device time left can give it more: BUDGET=S in front of the
#    command, with timeout_s = S + 20 (at most 600). A second call for some steps only
#    (e.g. after a fix): STEPS="2 3" in front of the command runs steps 2 and 3.
#    Then give_back, unless another call follows at once.
# 3. What comes back in $OUT (8 files at most; the reply's output_tail ends with the
#    step log):
#      run.log                    all output, each step's start, limit and exit code
#      env.txt                    GPU, driver, versions
#      pytest_gpu.xml             step 1: tests/plugins/fp8/test_gpu.py and the benchmarks' smoke
#                                 test on the GPU
#      bench/results/gpu_fp8.json step 2: the FP8 linear against BF16 at the 8 shapes (W held,
#                                 the once-per-step W/W^T quantization, speedup, slower
#                                 than BF16?), launches and host waits per forward +
#                                 backward, both in CUDA graphs, the quantization as called
#                                 against the copy's bandwidth, the GEMMs alone
#      bench/results/gpu_layer.json  step 3: the MLA + MoE decoder layer, FP8 vs BF16 vs
#                                 Megatron's MoELayer, with the kernel-family breakdown
#      bench/results/gpu_moe.json step 4 (if time is left): the MoE layer alone vs Megatron's
#      bench/results.md           the tables of the JSON files above
#      pytest_multirank.xml       step 6 (if time is left): `make test-gpu`
#    Here: copy the JSON files into bench/results/, then `python -m bench --report-only`
#    regenerates bench/results.md with them; write what the run showed in
#    bench/gpu-runs.md.
#
# Time plan (BUDGET 460 s; each step runs under min(its limit, the time left), a step that
# fails or runs out does not stop the next, and one with 5 s or less left is skipped):
#   set-up (env.txt, the wheel installed)            ~20 s
#   1. quick GPU tests                        limit  90 s (expected ~70)
#   2. gpu_fp8                                limit 150 s (expected ~60-90: 8 shapes x
#      (BF16, FP8, W per step) x 35 calls, profiles, recorded quantizations, GEMMs, graphs)
#   3. gpu_layer                              limit 140 s (expected ~60-100: 4 layers x 15
#      steps, the FP8 experts' per-expert linears being the slowest, and 4 profiles)
#   4. gpu_moe                                limit  60 s (its figures are already in
#      results.md; refreshed when the steps above left time)
#   5./6. other gpu tests, `make test-gpu`    what is left (none, usually)
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
BUDGET=${BUDGET:-460}  # seconds of the call's timeout_s, less 20 for a killed step's grace
START=$SECONDS         # and the transfer of $OUT

STEPS=" ${STEPS:-1 2 3 4 5 6} "  # the steps to run, by number
SUMMARY=""  # one line a step, repeated at the end (the reply's output_tail)

# step LABEL MAX_SECONDS CMD...: CMD under a timeout of MAX_SECONDS or the time left.
step() {
  local label=$1 max=$2 began=$((SECONDS - START)) line
  shift 2
  local left=$((BUDGET - began))
  local limit=$((max < left ? max : left))
  if [[ "$STEPS" != *" ${label%%.*} "* ]]; then return; fi  # not asked for
  echo "=== $label: $began s in, limit ${limit} s"
  if [ "$limit" -le 5 ]; then
    line="=== $label: skipped, no time left"
  else
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    line="=== $label: exit $rc$( [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo ' (out of time)')"
    line+=" after $((SECONDS - START - began)) s"
  fi
  echo "$line"
  SUMMARY+="$line"$'\n'
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

step "1. quick GPU tests" 90 python3 -m pytest -p no:cacheprovider -q -rfE --timeout=80 \
  --junitxml="$OUT/pytest_gpu.xml" tests/plugins/fp8/test_gpu.py tests/bench/test_gpu_smoke.py
step "2. gpu_fp8" 150 python3 -m bench gpu_fp8 --out "$OUT/bench"
step "3. gpu_layer" 140 python3 -m bench gpu_layer --out "$OUT/bench"
step "4. gpu_moe" 60 python3 -m bench gpu_moe --out "$OUT/bench"
# Other tests marked gpu (e.g. NCCL all-reduce); modules that fail to import on the
# device's packages are reported and skipped.
step "5. other gpu tests" 60 python3 -m pytest -p no:cacheprovider -q -rfE -m gpu \
  --continue-on-collection-errors --timeout=60 tests --ignore=tests/plugins/fp8/test_gpu.py \
  --ignore=tests/bench/test_gpu_smoke.py
# The multi-rank tests on NCCL, one GPU per rank (docs/testing.md "Parallel tests on a multi-GPU
# CI"); `-o setup`: the packages are installed above, there is no .venv here.
if command -v make >/dev/null; then
  step "6. make test-gpu" 150 make -o setup test-gpu PY=python3 \
    ARGS="-p no:cacheprovider --junitxml=$OUT/pytest_multirank.xml"
else  # the same command as the Makefile's test-gpu
  step "6. make test-gpu (no make here)" 150 env MEGASEEK_TEST_BACKEND=nccl python3 -m pytest \
    -m multirank --timeout=900 -rs tests -p no:cacheprovider \
    --junitxml="$OUT/pytest_multirank.xml"
fi
printf '%s' "$SUMMARY"
echo "=== done at $((SECONDS - START)) s"
