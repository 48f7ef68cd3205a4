#!/usr/bin/env bash
# Test afkern's Triton kernels against triton 3.6 (the version on the lent H100/H200 machines).
#
#   scripts/test_triton36.sh            # tests/test_triton_compile.py under triton 3.6 (~1-2 min)
#   scripts/test_triton36.sh --interp   # also the interpreter numerics, tests/test_triton_fusion.py
#
# No second environment: triton 3.6.0 and numpy < 2.4 (triton 3.6's interpreter calls int() on
# 1-element arrays, an error from numpy 2.4 on) are installed once into the folder .venv-triton36
# (git-ignored by `.venv-*/`) with `pip install --target`, and put first on PYTHONPATH for the
# main environment's python (.venv: torch, pytest, afkern editable), so only triton changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="$ROOT/.venv-triton36"
VPY="$ROOT/.venv/bin/python"
cd "$ROOT"
[[ -x "$VPY" ]] || { echo "[test_triton36] $VPY not found: run 'make venv' (or 'make test') first" >&2; exit 2; }

if ! PYTHONPATH="$TARGET" "$VPY" -c "import triton, numpy; assert triton.__version__.startswith('3.6') and numpy.__version__ < '2.4'" 2>/dev/null; then
    echo "[test_triton36] installing triton 3.6.0 into $TARGET"
    rm -rf "$TARGET" "$TARGET.tmp"
    "$VPY" -m pip install -q --disable-pip-version-check --no-deps --target "$TARGET.tmp" triton==3.6.0 "numpy<2.4" \
        2> >(grep -v "is ignored" >&2)
    mv "$TARGET.tmp" "$TARGET"
fi

export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
"$VPY" -c "import triton, torch; print('[test_triton36] triton', triton.__version__, 'from', triton.__file__.rsplit('/', 2)[0], '| torch', torch.__version__)"
TESTS=(tests/test_triton_compile.py)
if [[ "${1:-}" == "--interp" ]]; then
    TESTS+=(tests/test_triton_fusion.py tests/test_triton_routed_core.py tests/test_normfree_site.py -k "not patched_bert")
fi
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec "$VPY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
