#!/usr/bin/env bash
# Real build of afkern's CUDA extension (csrc/ -> afkern._C), no GPU needed, then its tests.
#
#   bash scripts/test_cuda_build.sh        (also run by `make test` and `make test-cuda-build`)
#
# 1. Finds nvcc and its toolkit folder (CUDA_HOME); without nvcc it prints SKIPPED and exits 0.
# 2. Creates .venv-cuda (git-ignored) if missing, with torch==2.14.1 (the CUDA 13.0 build) and
#    numpy, pytest, setuptools, wheel, ninja; reuses it when present.
# 3. Installs afkern into it, non-editable, with AFKERN_FORCE_CUDA_BUILD=1 (setup.py ->
#    csrc_build.py; ninja, MAX_JOBS=2, objects kept in build/ so a rerun recompiles only what
#    changed). Non-editable so the .so lands in .venv-cuda only, never in the source tree that
#    the CPU venv .venv imports.
# 4. Checks the cubins (sm_80, sm_90) with cuobjdump, writes the ptxas register/spill report
#    to build/cuda-ptxas.txt, and runs tests/test_cuda_ext.py with AFKERN_EXPECT_EXTENSION=1.
#
# Environment: PYTHON (default python3), VENV (default .venv-cuda), TORCH_PIN (default
# torch==2.14.1), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-cuda}"
TORCH_PIN="${TORCH_PIN:-torch==2.14.1}"
export MAX_JOBS="${MAX_JOBS:-2}"
START=$(date +%s)
log() { echo "test_cuda_build: $*"; }

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [ -z "$NVCC" ]; then
  log "SKIPPED: no nvcc on PATH (install a CUDA toolkit, or set CUDA_HOME) - nothing to build"
  exit 0
fi
# The toolkit folder: nvcc may be a wrapper script or a symlink; ask nvcc where it runs from.
HERE="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
if [ -n "$HERE" ] && [ -x "$HERE/nvcc" ]; then
  export CUDA_HOME="$(cd "$HERE/.." && pwd)"
else
  export CUDA_HOME="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
fi
export PATH="$CUDA_HOME/bin:$PATH"
log "nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_HOME=$CUDA_HOME"

# ---- venv --------------------------------------------------------------------------------
mkdir -p build
VENV_LOG="build/cuda-venv.log"
pip_quiet() {  # pip install into the venv; its chatter goes to $VENV_LOG, shown only on failure
  if ! "$VPY" -m pip install -q "$@" >>"$VENV_LOG" 2>&1; then
    tail -n 30 "$VENV_LOG"; log "FAILED: pip install $* (log: $VENV_LOG)"; exit 1
  fi
}
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
VPY="$(cd "$VENV" && pwd)/bin/python"
WANT="${TORCH_PIN#torch==}"
HAVE="$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$HAVE" != "$WANT" ]; then
  log "installing $TORCH_PIN into $VENV (have: ${HAVE:-none})"
  pip_quiet "$TORCH_PIN"
fi
if ! "$VPY" -c 'import numpy, pytest, setuptools, wheel, ninja' 2>/dev/null; then
  pip_quiet numpy pytest setuptools wheel ninja
fi
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"  # ninja
"$VPY" - <<'EOF'
import torch
assert torch.version.cuda is not None, f"{torch.__version__} is a CPU build; the extension needs a CUDA build of torch"
print(f"test_cuda_build: torch {torch.__version__} (CUDA {torch.version.cuda}), GPU present: {torch.cuda.is_available()}")
EOF

# ---- build -------------------------------------------------------------------------------
BUILD_LOG="build/cuda-build.log"
log "building afkern._C (MAX_JOBS=$MAX_JOBS; log: $BUILD_LOG)"
T0=$(date +%s)
if ! AFKERN_FORCE_CUDA_BUILD=1 AFKERN_SKIP_CPU_BUILD=1 AFKERN_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    "$VPY" -m pip install -v --no-build-isolation --no-deps --no-cache-dir . >"$BUILD_LOG" 2>&1; then
  tail -n 60 "$BUILD_LOG"
  log "FAILED: the extension did not build (full log: $BUILD_LOG)"
  exit 1
fi
log "build + install took $(( $(date +%s) - T0 )) s"

# (from / so that the source tree's afkern, which has no _C, is not on sys.path)
SO="$(cd / && "$VPY" -c 'import importlib.util as u; print(u.find_spec("afkern._C").origin)')"
log "extension: $SO"

# ptxas report: registers / spills / static shared memory per kernel, dtype and architecture
# (a rerun where ninja recompiled nothing keeps the last full report)
if grep -q "ptxas info" "$BUILD_LOG"; then
  "$VPY" - "$BUILD_LOG" > build/cuda-ptxas.txt <<'EOF'
import re, sys
txt = open(sys.argv[1]).read()
rows = set()
pat = (r"Compiling entry function '(\S+)' for '(sm_\d+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
       r".*?Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
for m in re.finditer(pat, txt, re.S):
    name, arch, st, ld, regs, smem = m.groups()
    k = re.search(r"([a-z_]+)_kernel", name)
    dt = "bf16" if "bfloat16" in name else "fp16" if "half" in name else "fp32"
    rows.add((k.group(1) if k else name, dt, arch, int(regs), int(st), int(ld), int(smem or 0)))
for r in sorted(rows):
    print("%-11s %-5s %-6s regs=%-3d spill_stores=%d spill_loads=%d static_smem=%d" % r)
EOF
fi
if [ -s build/cuda-ptxas.txt ]; then
  sed 's/^/  /' build/cuda-ptxas.txt
  if grep -qE "spill_(stores|loads)=[1-9]" build/cuda-ptxas.txt; then log "WARNING: register spills (see above)"; fi
fi

# ---- cubins ------------------------------------------------------------------------------
CUOBJDUMP="$(command -v cuobjdump || true)"
if [ -z "$CUOBJDUMP" ]; then
  CUOBJDUMP="$(ls "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -n1 || true)"
fi
if [ -n "$CUOBJDUMP" ]; then
  ELFS="$("$CUOBJDUMP" --list-elf "$SO")"
  echo "$ELFS" | sed 's/^/  /'
  for arch in sm_80 sm_90; do
    if ! echo "$ELFS" | grep -q "$arch"; then log "FAILED: no $arch cubin in $SO"; exit 1; fi
  done
  "$CUOBJDUMP" --list-ptx "$SO" | sed 's/^/  /'
else
  log "cuobjdump not found (neither on PATH nor in triton's wheel): cubin check not done"
fi

# ---- tests -------------------------------------------------------------------------------
log "running tests/test_cuda_ext.py against the built extension"
AFKERN_EXPECT_EXTENSION=1 "$VENV/bin/pytest" -q -p no:cacheprovider tests/test_cuda_ext.py
log "OK in $(( $(date +%s) - START )) s"
