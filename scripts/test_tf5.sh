#!/usr/bin/env bash
# Integration tests of afkern on transformers 5.x (issue 7).
#
# AdapterHub's `adapters` does not install on transformers 5 (its issue #834), so this runs the
# tests that need only afkern: model-family patching, fused vs reference outputs and gradients,
# AdapterHub-directory load/save round trips (afkern -> afkern, and directories written here),
# adapter control. Tests that need `adapters` skip themselves here (pytest.importorskip) and run
# in the main .venv (transformers 4.57) with `make test`.
#
# Idempotent: the venv .venv-tf5 (git-ignored) is created once and re-used; it is rebuilt only
# when the pins below change. Exits non-zero when a test fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${AFKERN_TF5_VENV:-.venv-tf5}"
PY="${PY:-python3}"
PINS="torch==2.13.0 transformers==5.18.0 safetensors>=0.4 pytest>=8 numpy matplotlib onnx onnxruntime accelerate"
STAMP="$VENV/.afkern-tf5-installed"
TESTS=(tests/test_models.py tests/test_adapterhub_io.py tests/test_control.py tests/test_analysis.py tests/test_checkpointing.py tests/test_pretrained.py
       tests/test_families.py tests/test_families_tf5.py)

if [[ ! -f "$STAMP" ]] || [[ "$(cat "$STAMP")" != "$PINS" ]]; then
    echo "test_tf5: setting up $VENV ($PINS)"
    test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
    # pip's warnings about this machine's extra local index folders are noise: keep errors only
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel 2> >(grep -v "is ignored" >&2)
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $PINS 2> >(grep -v "is ignored" >&2)
    AFKERN_SKIP_CUDA_BUILD=1 AFKERN_SKIP_CPU_BUILD=1 "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . \
        > /dev/null 2> >(grep -E -i "error" >&2 || true)
    echo "$PINS" > "$STAMP"
fi

"$VENV/bin/python" - <<'EOF'
import torch, transformers
assert transformers.__version__.startswith("5."), f"expected transformers 5.x, got {transformers.__version__}"
print(f"test_tf5: torch {torch.__version__}, transformers {transformers.__version__}")
EOF

exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
