#!/usr/bin/env bash
# GPU validation of afkern, for a session that has a CUDA GPU (H100/H200 here). Not part of CI
# (CI has no GPU). Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_validate.sh            # build, GPU tests, benchmark; results under $OUT or out/gpu
#
# What it does, in order, each step logged to $RESULTS/*.log:
#   1. builds the CUDA extension against the machine's torch (AFKERN_FORCE_CUDA_BUILD=1),
#   2. runs the kernel tests on the device (AFKERN_TEST_GPU=1: Triton compiled, not interpreted;
#      the CUDA ops against the reference, opcheck),
#   3. runs afkern-bench in bfloat16 on the device with every afkern provider (and `adapters`
#      when installed) and writes benchmarks/results/<gpu-name>/ (commit it with the device name).
# The GPU image has torch, triton and transformers but maybe not pytest/adapters: missing wheels
# can be carried (see the device tool's README); the steps that need them say so and go on.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:-$ROOT/out/gpu}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
status=0

echo "== device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/device.txt"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$RESULTS/device.txt"

echo "== 1. build the CUDA extension"
if AFKERN_FORCE_CUDA_BUILD=1 MAX_JOBS=8 $PY -m pip install --no-deps --no-build-isolation -e . > "$RESULTS/build.log" 2>&1; then
    $PY -c "import afkern.backends.cuda_ops as c; print('extension:', c.extension_status())" | tee -a "$RESULTS/build.log"
else
    echo "build FAILED (see build.log)"; tail -30 "$RESULTS/build.log"; status=1
fi

echo "== 2. kernel tests on the GPU"
if $PY -c "import pytest" 2>/dev/null; then
    AFKERN_TEST_GPU=1 AFKERN_EXPECT_EXTENSION=1 $PY -m pytest -q -rs tests/test_triton_fusion.py tests/test_cuda_ext.py \
        tests/test_fusion.py tests/test_block.py 2>&1 | tee "$RESULTS/gpu_tests.log" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "pytest is not installed here: carry its wheel (device README) to run the GPU tests" | tee "$RESULTS/gpu_tests.log"
    status=1
fi

echo "== 3. benchmark (bfloat16)"
providers="plain,plain_layer,reference,torch,triton,cuda"
$PY -c "import adapters" 2>/dev/null && providers="$providers,adapters"
$PY -m afkern.bench --device cuda --dtype bfloat16 --providers "$providers" --n-adapters 1,2,4,8,16,32,64 \
    --tokens 4096 --model-tokens 4096 --layers 12 --output-dir benchmarks/results 2>&1 | tee "$RESULTS/bench.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cp -r benchmarks/results/* "$RESULTS/" 2>/dev/null || true
exit $status
