#!/usr/bin/env bash
# Mutation check of the test suite: plants each mutant of scripts/mutants/mutants.txt, one at a
# time, in a scratch copy of the tree (/tmp/afkern-mutants by default), runs the tests listed for
# it and reports every survivor. The repository itself is never modified.
#
#   bash scripts/mutants.sh                       all mutants (a baseline run of each test selection first)
#   bash scripts/mutants.sh --only ID[,ID...]     some of them
#   bash scripts/mutants.sh --list FILE           another list (same format)
#   bash scripts/mutants.sh --no-baseline         skip the unmutated runs
#
# Exit status 0: every mutant that ran was killed; 1: a survivor or an ERROR (a stale anchor); 2: a test
# selection fails on the unmutated tree. Mutants of csrc/ need a CUDA device (reported NEEDS-GPU
# elsewhere). Environment: PYTHON (default .venv/bin/python), AFKERN_MUTANTS_DIR (scratch folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" scripts/mutants/run.py --python "$PYTHON" "$@"
