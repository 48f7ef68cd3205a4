#!/usr/bin/env bash
# Compile-test afkern's Triton kernels against triton 3.6 (the version on the lent H100/H200
# machines) in a separate virtual environment, .venv-triton36 (git-ignored by `.venv-*/`).
#
#   scripts/test_triton36.sh            # tests/test_triton_compile.py under triton 3.6 (~1-2 min)
#   scripts/test_triton36.sh --interp   # also the interpreter numerics, tests/test_triton_fusion.py
#
# The venv is created on first use (torch 2.13.0 CPU, triton 3.6.0, pytest, numpy < 2.4; afkern itself
# installed editable without dependencies so that kernels/ resolves as afkern.kernels) and reused.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-triton36"
PY="${PYTHON:-python3}"
cd "$ROOT"

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import triton, torch, pytest, numpy, afkern.kernels; assert triton.__version__.startswith('3.6') and numpy.__version__ < '2.4'" 2>/dev/null; then
    echo "[test_triton36] creating $VENV"
    rm -rf "$VENV.tmp"
    "$PY" -m venv "$VENV.tmp"
    # numpy < 2.4: triton 3.6's interpreter calls int() on 1-element arrays, an error from numpy 2.4 on
    "$VENV.tmp/bin/pip" install -q --disable-pip-version-check torch==2.13.0 triton==3.6.0 pytest "numpy<2.4"
    rm -rf "$VENV"
    mv "$VENV.tmp" "$VENV"
    # console scripts carry the absolute venv path in their shebang: call pip through python
    AFKERN_SKIP_CUDA_BUILD=1 "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        --no-deps --no-build-isolation -e "$ROOT"
fi

"$VENV/bin/python" -c "import triton, torch; print('[test_triton36] triton', triton.__version__, 'torch', torch.__version__)"
TESTS=(tests/test_triton_compile.py)
if [[ "${1:-}" == "--interp" ]]; then
    TESTS+=(tests/test_triton_fusion.py -k "not patched_bert")  # transformers is not in this venv
fi
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
