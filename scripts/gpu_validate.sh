#!/usr/bin/env bash
# GPU validation of afkern in stages, for the lent GPU machine (H200 / H100). Not part of CI (CI has
# no GPU). A session is lent 15 minutes of device time in all (start, calls, idle and close), so the
# plan is TWO calls of the device tool (docs/GPU_RUNBOOK.md gives each call's exact arguments):
#
#   bash scripts/gpu_validate.sh call1    (timeout_s 500; deadline 470 s)  build tests ceilings quick
#   bash scripts/gpu_validate.sh call2    (timeout_s 360; deadline 330 s)  autotune graphs
#   bash scripts/gpu_validate.sh plan     print both calls' stages, caps and deadlines (no work; tests/test_gpu_plan.py)
#   bash scripts/gpu_validate.sh STAGE [STAGE ...]                          any stages, in the order given
#
# Stages (each installs what it needs, so each works alone on a fresh machine; [cap] = the most
# seconds a stage may take, AFKERN_GPU_CAP_<STAGE> overrides it; every stage also ends at the deadline):
#   build        build afkern's CUDA extension against this machine's torch; keep it for call 2
#                (.gpu/ext/, packed into carry.tar.gz); the test entries marked EARLY=1 (they
#                need no extension) start before it and run during it                   [160 s]
#   tests        the kernel tests on the GPU: every entry of scripts/gpu_tests.txt, each its own
#                process, AFKERN_GPU_TEST_JOBS (4) at a time, AFKERN_TEST_GPU=1 (Triton compiled),
#                AFKERN_EXPECT_EXTENSION=1 (XDIST=N before an entry: its tests over N processes where
#                pytest-xdist is installed); missing files are reported, not failed        [190 s]
#   ceilings     the card's copy bandwidth and 8192^3 matmul rates (scripts/gpu_ceilings.py) [30 s]
#   quick        afkern-bench bf16, every provider, block N=1,16,64 and the 12-layer model at N=16,
#                T=4096 (inference and a fusion-training step), + the roofline report  [the rest]
#   autotune     Triton configs at BERT-base/large widths, bf16 first, N=16,1,64 ->
#                kernels/tuned_configs.json                                               [210 s]
#   graphs       the decode step (GPT-2 small width, 4 layers, Fuse(8), batch 1, KV cache) under
#                torch.cuda.CUDAGraph and torch.compile(mode="reduce-overhead"), plain / torch /
#                triton (scripts/gpu_graphs.py); reports what cannot capture, never fails on it [the rest]
#   bench-block  full benchmark, block, N=1..64, T=4096, forward/backward/full           (later sessions)
#   bench-infer  full benchmark, 12-layer model, N=1..64, T=4096, inference              (later sessions)
#   bench-train  full benchmark, 12-layer model, N=1..64, T=4096, a fusion-training step (later sessions)
#   report       the roofline/auto report over every benchmark folder of this device (no GPU work)
# Aliases: call1 = build tests ceilings quick; call2 = autotune graphs; day1 = build tests;
#          full = bench-block bench-infer bench-train.
#
# What comes back (at most 4 files under $OUT, each < 16 MiB; default out/gpu):
#   summary.txt      every stage's short table and the stage table (also printed last); REWRITTEN
#                    after every test entry and every stage, so a call cut short still returns one
#   logs.tar.gz      out/gpu-logs/: every log, JUnit XML, env.txt
#   results.tar.gz   benchmarks/results/gpu-*/<device-slug>/ (+ kernels/tuned_configs.json): extract at
#                    the repository root (tar xzf results.tar.gz) and commit
#   carry.tar.gz     .gpu/ (the built extension and the Triton kernel cache; the extension alone when
#                    .gpu passes 38 MiB, so that .gpu + .whl + the tree stay under the 64 MiB a call
#                    may carry): extract at the root and carry ".gpu" in call 2, so it neither
#                    rebuilds nor recompiles
#
# Time: no stage starts, and a running test or benchmark is stopped (SIGINT; afkern-bench keeps
# what it measured, row by row), when fewer than AFKERN_GPU_RESERVE_S (25) seconds would remain
# before AFKERN_GPU_DEADLINE_S (call1 470, call2 330, else 540 s from the start): keep it about
# 30 s under the call's timeout_s, so that the packing always runs.
#
# Environment: PYTHON (python3), OUT, AFKERN_GPU_DEADLINE_S, AFKERN_GPU_RESERVE_S, AFKERN_GPU_CAP_<STAGE>,
#   AFKERN_GPU_TESTS (the test list, scripts/gpu_tests.txt), AFKERN_GPU_TEST_TIMEOUT (per entry, 200),
#   AFKERN_GPU_TEST_JOBS (entries at a time: 4; 1 in the dry run), AFKERN_GPU_AUTOBUILD (1; call2: 0:
#   a stage other than build never builds the extension when none is carried),
#   AFKERN_GPU_TEST_ONLY (a regex: only the list's entries that match it, e.g. to finish in a second call),
#   AFKERN_GPU_NS (1,2,4,8,16,32,64), AFKERN_GPU_TOKENS (4096), AFKERN_GPU_LAYERS (12),
#   AFKERN_GPU_PROVIDERS (plain,plain_layer,reference,adapters,torch,triton,cuda),
#   AFKERN_GPU_BENCH_ARGS (appended to every afkern-bench call), AFKERN_GPU_TAG (a suffix of the
#   results folder, gpu-<part><tag>: a part split over two calls must not overwrite its first half),
#   AFKERN_GPU_TUNE_NS (16,1,64), AFKERN_GPU_TUNE_DTYPES (bfloat16,float16,float32),
#   AFKERN_GPU_HUB (auto: the AdapterHub stack of .whl/hub when present; 0: never; 1: required),
#   AFKERN_GPU_DRY=1 (the dry run on a CPU: every stage's code path at tiny sizes, device cpu, the
#   tests collected and each entry's first test run in the Triton interpreter, results under
#   out/gpu-dry/; AFKERN_GPU_DRY_TESTS=full runs the entries whole),
#   AFKERN_GPU_SLUG (the device's results folder name; default: asked of torch -- set it to run
#   `report` on this machine over a GPU's results), MAX_JOBS (16; the extension build).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DRY="${AFKERN_GPU_DRY:-0}"
T0=$(date +%s)
DEADLINE=0  # set once the stages are known (call1 / call2 have their own default)
STAGE_END=0
RESERVE="${AFKERN_GPU_RESERVE_S:-25}"

if [ "$DRY" = "1" ]; then
    BASE="out/gpu-dry"
    OUTDIR="${OUT:-$ROOT/$BASE/OUT}"
    RESULTS_ROOT="$BASE/results"
    CARRY="$BASE/carry"
    TUNED_FILE="$BASE/tuned_configs.json"
    LOGS="$ROOT/$BASE/logs"
    SITE="${AFKERN_GPU_SITE:-/tmp/afkern-gpu-dry-site}"
    export MAX_JOBS="${MAX_JOBS:-2}" AFKERN_GPU_DRY=1
else
    OUTDIR="${OUT:-$ROOT/out/gpu}"
    RESULTS_ROOT="benchmarks/results"
    CARRY=".gpu"
    TUNED_FILE="kernels/tuned_configs.json"
    LOGS="$ROOT/out/gpu-logs"
    SITE="${AFKERN_GPU_SITE:-/tmp/afkern-gpu-site}"
    export MAX_JOBS="${MAX_JOBS:-16}"
fi
HUB_SITE="$SITE-hub"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR="$ROOT/$CARRY/triton-cache"
export AFKERN_TUNED_CONFIGS="$ROOT/$TUNED_FILE"
STAGES_TSV="$LOGS/stages.tsv"
SLUG="${AFKERN_GPU_SLUG:-}"  # the results folder of the device; set it to report here on a GPU's results
READY=""
BENCH_PP=""
OVERALL=0

# ------------------------------------------------------------------------------------------ helpers
now() { date +%s; }
left() { echo $(( DEADLINE - $(now) )); }
log() { echo "[gpu_validate +$(( $(now) - T0 ))s] $*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STAGES_TSV"; [ "$2" = ok ] || [ "$2" = skipped ] || OVERALL=1; }
budget() {  # seconds a step may take: at most CAP, within the deadline (less the packing reserve) and the stage's cap
    local cap=$1 l s; l=$(( $(left) - RESERVE )); s=$(( STAGE_END - $(now) ))
    [ "$STAGE_END" -gt 0 ] && [ "$s" -lt "$l" ] && l=$s
    echo $(( l < cap ? l : cap ))
}
safepy() { env PYTHONPATH="${PYTHONPATH:-}" PYTHONSAFEPATH=1 "$@"; }  # never the source tree's afkern/ (no kernels, no _C)

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

env_header() {
    [ -f "$LOGS/env.txt" ] && return 0
    {
        echo "date: $(date -Is)  host: $(hostname)  dry: $DRY"
        if command -v nvidia-smi >/dev/null 2>&1; then
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
                --format=csv,noheader 2>&1
        else
            echo "nvidia-smi: not here"
        fi
        "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
import torch
line = [f"python {platform.python_version()} ({sys.executable})", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
for m in ("triton", "transformers", "pytest", "numpy", "setuptools"):
    try:
        line.append(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:
        line.append(f"{m} -")
print(", ".join(line))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
EOF
        (command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2 | head -n 1) || echo "nvcc: not on PATH"
    } > "$LOGS/env.txt" 2>&1
    sed 's/^/  /' "$LOGS/env.txt"
}

find_cuda_home() {
    [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && return 0
    local nvcc here
    nvcc="$(command -v nvcc || true)"
    [ -z "$nvcc" ] && for d in /usr/local/cuda /usr/local/cuda-13.0; do [ -x "$d/bin/nvcc" ] && nvcc="$d/bin/nvcc" && break; done
    [ -z "$nvcc" ] && return 1
    here="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
    if [ -n "$here" ] && [ -x "$here/nvcc" ]; then export CUDA_HOME="$(cd "$here/.." && pwd)"
    else export CUDA_HOME="$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)"; fi
    export PATH="$CUDA_HOME/bin:$PATH"
}

torch_cuda() { "$PY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null; }
gpu_present() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
carried_so() { ls "$ROOT/$CARRY"/ext/_C*.so 2>/dev/null | head -n1; }

# Install afkern into $SITE/pkgs, outside the source tree, with the carried extension (.gpu/ext) if
# any. $1 = build: then build the extension (into $SITE/build, so that processes running from
# $SITE/pkgs meanwhile are undisturbed) and copy it into $SITE/pkgs and .gpu/ext; $1 = noext: never
# build now; else build it only if none is carried (AFKERN_GPU_AUTOBUILD=1).
BUILD_NOTE=""
ensure_afkern() {
    local want_build=0 so rc t1
    [ -n "$READY" ] && [ "${1:-}" != build ] && return 0
    if [ -z "$READY" ]; then
        rm -rf "$SITE/pkgs"; mkdir -p "$SITE/pkgs"
        if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then  # extra wheels for the main environment, if any
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/deps" \
                "$ROOT"/.whl/*.whl > "$LOGS/wheels.log" 2>&1 || log "WARNING: .whl/*.whl did not install (wheels.log)"
        fi
        AFKERN_SKIP_CUDA_BUILD=1 AFKERN_SKIP_CPU_BUILD=1 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
            --no-warn-script-location --target "$SITE/pkgs" . > "$LOGS/install.log" 2>&1 \
            || { log "FAILED: pip install of afkern (install.log)"; tail -n 20 "$LOGS/install.log"; return 1; }
        so="$(carried_so)"
        [ -n "$so" ] && cp "$so" "$SITE/pkgs/afkern/"
        export PYTHONPATH="$SITE/pkgs"
        if [ -d "$SITE/deps" ]; then export PYTHONPATH="$PYTHONPATH:$SITE/deps"; fi
        READY=1
    fi
    so="$(carried_so)"
    if [ "${1:-}" = build ]; then want_build=1
    elif [ -z "$so" ] && [ "${1:-}" != noext ] && [ "$DRY" != 1 ] && [ -n "$(torch_cuda)" ] \
         && [ "${AFKERN_GPU_AUTOBUILD:-1}" = 1 ]; then
        log "no carried extension ($CARRY/ext): building it now (carry .gpu next time)"; want_build=1
    fi
    if [ $want_build = 1 ] && [ -z "$(torch_cuda)" ]; then
        BUILD_NOTE="SKIPPED: torch $("$PY" -c 'import torch; print(torch.__version__)') is a CPU build"
        log "$BUILD_NOTE"; want_build=0
    fi
    if [ $want_build = 1 ] && ! find_cuda_home; then
        BUILD_NOTE="FAILED: no nvcc (set CUDA_HOME)"; log "$BUILD_NOTE"; want_build=0
    fi
    if [ $want_build = 1 ]; then
        t1=$(now)
        rm -rf "$SITE/build"
        log "building afkern._C (MAX_JOBS=$MAX_JOBS, CUDA_HOME=$CUDA_HOME; log: build.log)"
        AFKERN_FORCE_CUDA_BUILD=1 AFKERN_SKIP_CPU_BUILD=1 AFKERN_PTXAS_VERBOSE=1 timeout -k 10 "$(budget 420)" "$PY" -m pip install -v \
            --no-index --no-deps --no-build-isolation --no-compile --no-warn-script-location --target "$SITE/build" . \
            > "$LOGS/build.log" 2>&1
        rc=$?
        if [ $rc = 0 ] && compgen -G "$SITE/build/afkern/_C*.so" >/dev/null; then
            rm -f "$ROOT/$CARRY"/ext/_C*.so "$SITE"/pkgs/afkern/_C*.so
            cp "$SITE"/build/afkern/_C*.so "$ROOT/$CARRY/ext/" && cp "$SITE"/build/afkern/_C*.so "$SITE/pkgs/afkern/" \
                && BUILD_NOTE="ok in $(( $(now) - t1 )) s"
        else
            BUILD_NOTE="FAILED (rc $rc) after $(( $(now) - t1 )) s: see build.log"
            tail -n 25 "$LOGS/build.log"
        fi
        log "build: $BUILD_NOTE"
    fi
    EXT_STATUS="$(safepy "$PY" -c 'import afkern.backends.cuda_ops as c; print(c.extension_status())' 2>&1 | tail -n1)"
    log "afkern from $SITE/pkgs; extension: $EXT_STATUS"
}

ensure_slug() {
    [ -n "$SLUG" ] && return 0
    local dev=""; [ "$DRY" = 1 ] && dev="--device cpu"
    SLUG="$(safepy "$PY" "$ROOT/scripts/gpu_tools.py" slug $dev 2>/dev/null | tail -n1)"
    [ -n "$SLUG" ] || SLUG="unknown-device"
}

# The AdapterHub baseline stack (adapters 1.3.0 + transformers 4.57.6, from .whl/hub) in its own
# folder, ahead of the image's transformers 5.x for the benchmark process only.
hub_env() {
    BENCH_PP="${PYTHONPATH:-}"
    local mode="${AFKERN_GPU_HUB:-auto}" v
    if [ "$mode" = 0 ]; then log "AdapterHub stack: off (AFKERN_GPU_HUB=0)"; return 0; fi
    if ! compgen -G "$ROOT/.whl/hub/*.whl" >/dev/null; then
        [ "$mode" = 1 ] && { log "FAILED: AFKERN_GPU_HUB=1 but no .whl/hub/*.whl (run scripts/gpu_wheels.sh, carry .whl)"; return 1; }
        log "AdapterHub stack: no .whl/hub wheels; provider adapters only if importable here"; return 0
    fi
    if [ ! -d "$HUB_SITE/adapters" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HUB_SITE" \
            "$ROOT"/.whl/hub/*.whl > "$LOGS/hub.log" 2>&1 || { log "WARNING: .whl/hub did not install (hub.log)"; return 0; }
    fi
    v="$(env PYTHONPATH="$HUB_SITE:${PYTHONPATH:-}" PYTHONSAFEPATH=1 "$PY" -c \
        'import transformers, adapters, tokenizers, huggingface_hub as h; print(f"adapters {adapters.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, huggingface_hub {h.__version__}")' 2>>"$LOGS/hub.log" | tail -n1)"
    if [ -n "$v" ]; then
        BENCH_PP="$HUB_SITE:${PYTHONPATH:-}"
        log "AdapterHub stack ($HUB_SITE): $v -- the benchmark process runs every provider on it"
    else
        log "WARNING: the AdapterHub stack does not import (hub.log); benchmarking without provider adapters"
        [ "$mode" = 1 ] && return 1
    fi
}

run_stage() {  # run_stage NAME FUNCTION: time it, record its result
    local name=$1 fn=$2 t1 rc
    if [ "$(left)" -le "$(( RESERVE + 15 ))" ]; then
        record "$name" skipped 0 "deadline: $(left) s left"; log "stage $name skipped: deadline"; return 0
    fi
    local cap; cap="$(stage_cap "$name")"
    t1=$(now)
    STAGE_END=$(( t1 + cap ))
    echo; log "==== stage $name ($(left) s left; cap $cap s)"
    NOTE=""
    "$fn"; rc=$?
    STAGE_END=0
    record "$name" "$( [ $rc = 0 ] && echo ok || echo "FAILED" )" "$(( $(now) - t1 ))" "$NOTE"
    snapshot
}

stage_cap() {  # the most seconds stage $1 may take (AFKERN_GPU_CAP_<STAGE> overrides; 100000: the rest)
    local var="AFKERN_GPU_CAP_$(echo "$1" | tr 'a-z-' 'A-Z_')" d
    case "$1" in build) d=160 ;; tests) d=190 ;; ceilings) d=30 ;; autotune) d=210 ;; *) d=100000 ;; esac
    echo "${!var:-$d}"
}

# summary.txt under $OUT now: the stages' tables so far, the test entries finished so far, the stage
# table. Called after every test entry and every stage, so that a call killed at its timeout_s
# still returns a summary (pack() writes the final one and the archives).
stage_summaries() {  # every table of the stages run so far
    local s f
    for s in "${RAN[@]}"; do
        f="$LOGS/summary_${s#bench-}.txt"
        case "$s" in quick|bench-*) f="$LOGS/summary_${s#bench-}${AFKERN_GPU_TAG:-}.txt" ;; esac
        [ -f "$f" ] && { echo; cat "$f"; }
    done
}

snapshot() {
    {
        echo "(snapshot at +$(( $(now) - T0 )) s; a call that ended cleanly has the '==== packed' line in its output)"
        stage_summaries
        if [ -s "$LOGS/tests_status.tsv" ] && [ ! -f "$LOGS/summary_tests.txt" ]; then
            echo; echo "kernel tests so far:"
            "$PY" "$ROOT/scripts/gpu_tools.py" tests-summary "$LOGS/tests_status.tsv" "$LOGS/junit"
        fi
        echo; echo "stages so far:"
        "$PY" "$ROOT/scripts/gpu_tools.py" stages "$STAGES_TSV"
    } > "$OUTDIR/summary.tmp.$BASHPID" 2>&1
    mv -f "$OUTDIR/summary.tmp.$BASHPID" "$OUTDIR/summary.txt"
}

# ------------------------------------------------------------------------------------------ stages
st_build() {
    env_header
    ensure_afkern noext || return 1
    # the test entries marked EARLY=1 (no extension needed) start now and run during the build
    [[ " ${STAGES[*]} " == *" tests "* ]] && { mkdir -p "$LOGS/junit"; : > "$LOGS/tests_status.tsv"; launch_entries early; }
    ensure_afkern build || return 1
    local so size elfs regs spills
    so="$(ls "$SITE"/build/afkern/_C*.so 2>/dev/null | head -n1)"
    size="-"; elfs="-"; regs="-"; spills="-"
    if [ -n "$so" ]; then
        size="$(( $(stat -c %s "$so") / 1024 )) KiB"
        local cuobjdump
        cuobjdump="$(command -v cuobjdump || "$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
        [ -x "$cuobjdump" ] && elfs="$("$cuobjdump" --list-elf "$so" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')"
    fi
    if grep -q "ptxas info" "$LOGS/build.log" 2>/dev/null; then
        regs="$(grep -o 'Used [0-9]* registers' "$LOGS/build.log" | awk '{print $2}' | sort -n | tail -n1)"
        spills="$(grep -o '[0-9]* bytes spill stores' "$LOGS/build.log" | awk '{s+=$1} END {print s+0}')"
    fi
    NOTE="$BUILD_NOTE"
    {
        echo "build stage:"
        printf '| %-23s | %s |\n|-------------------------|-------|\n' item value
        printf '| %-23s | %s |\n' "torch / CUDA" "$(safepy "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1 | tail -n1)" \
            "nvcc" "$( (command -v nvcc >/dev/null && nvcc --version | grep -o 'release [0-9.]*') || echo -)" \
            "build" "${BUILD_NOTE:-not run}" "extension" "$EXT_STATUS" "shared object" "${so:--} ($size)" \
            "cubins" "${elfs:--}" "ptxas max regs / spills" "$regs / $spills B" \
            "kept for later calls" "$(carried_so || true)"
    } | tee "$LOGS/summary_build.txt"
    case "$BUILD_NOTE" in ok*) return 0 ;; SKIPPED*) [ "$DRY" = 1 ] && return 0 ;; esac
    return 1
}

# One entry of the test list in its own process (run in the background by st_tests): writes its
# status line (entry, result, seconds, JUnit XML) and refreshes summary.txt.
run_entry() {  # run_entry ENTRY SAFE TIMEOUT NENV ENV... PYTEST-ARGS...
    local m=$1 safe=$2 tmo=$3 nenv=$4 t1 rc st first e; shift 4
    local -a envs=("${@:1:$nenv}"); shift "$nenv"
    local -a args=("$@") run=("$m") par=()
    local -a penv=("${common_env[@]}" "${envs[@]}" PYTHONPATH="$PYTHONPATH" PYTHONSAFEPATH=1)
    t1=$(now)
    for e in "${envs[@]}"; do  # XDIST=N: the entry's tests over N processes, where pytest-xdist is installed
        [[ "$e" == XDIST=* ]] && [ "${e#XDIST=}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null && par=(-n "${e#XDIST=}")
    done
    if [ "$DRY" = 1 ] && [ "${AFKERN_GPU_DRY_TESTS:-first}" != full ]; then  # the dry run: collect, run the first test
        first="$(env "${penv[@]}" "$PY" -m pytest -q --collect-only -p no:cacheprovider -o addopts="" "$m" "${args[@]}" \
                 2>"$LOGS/tests_$safe.collect.err" < /dev/null | grep -m1 '::')"
        [ -n "$first" ] && run=("$first")
        par=()
    fi
    env "${penv[@]}" timeout -s INT -k 15 "$tmo" "$PY" -m pytest -q -rfEs -p no:cacheprovider -o addopts="" \
        --junitxml="$LOGS/junit/$safe.xml" "${par[@]}" "${run[@]}" "${args[@]}" > "$LOGS/tests_$safe.log" 2>&1 < /dev/null
    rc=$?
    case $rc in 0) st=ok ;; 5) st="ok (none ran)" ;; 124) st=TIMEOUT ;; *) st="FAILED (rc $rc)" ;; esac
    [ "${run[0]}" != "$m" ] && st="$st (dry: ${run[0]#"$m"})"
    printf '%s\t%s\t%s\t%s\n' "$m${args[*]:+ ${args[*]}}" "$st" "$(( $(now) - t1 ))" "$LOGS/junit/$safe.xml" >> "$LOGS/tests_status.tsv"
    log "tests: $m${args[*]:+ ${args[*]}}: $st in $(( $(now) - t1 )) s -- $(tail -n1 "$LOGS/tests_$safe.log")"
    snapshot
}

# Start the entries of the test list in the background, AFKERN_GPU_TEST_JOBS at a time: WHICH =
# early (only those marked EARLY=1: they need no extension, and start during the build), rest (the
# others, plus the early ones when no build stage started them), in the list's order.
EARLY_STARTED=""
launch_entries() {
    local which=$1 list="${AFKERN_GPU_TESTS:-scripts/gpu_tests.txt}" status="$LOGS/tests_status.tsv"
    local line target file safe tmo m m2 matches envs args jobs early
    [ -f "$list" ] || return 0  # st_tests reports a missing list
    jobs="${AFKERN_GPU_TEST_JOBS:-4}"; [ "$DRY" = 1 ] && jobs="${AFKERN_GPU_TEST_JOBS:-1}"
    common_env=(AFKERN_TEST_GPU=1 AFKERN_EXPECT_EXTENSION=1)
    [ "$DRY" = 1 ] && common_env=(TRITON_INTERPRET=1 AFKERN_GPU_DRY=1)
    # an early entry's time limit runs to the end of the tests stage, not of the build stage
    [ "$which" = early ] && local STAGE_END=$(( $(now) + $(stage_cap build) + $(stage_cap tests) ))
    log "tests ($which): $jobs entries at a time (one GPU; the Triton compiles are per process, on the CPU cores)"
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%%#*}"; [ -z "${line//[[:space:]]/}" ] && continue
        eval "set -- $line"
        envs=(); early=0
        while [ $# -gt 0 ] && [[ "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do envs+=("$1"); [ "$1" = EARLY=1 ] && early=1; shift; done
        target="$1"; shift; args=("$@")
        file="${target%%::*}"
        if [ -n "${AFKERN_GPU_TEST_ONLY:-}" ] && ! [[ "$target" =~ $AFKERN_GPU_TEST_ONLY ]]; then continue; fi
        if [ "$which" = early ] && [ $early = 0 ]; then continue; fi
        if [ "$which" = rest ] && [ $early = 1 ] && [ -n "$EARLY_STARTED" ]; then continue; fi
        matches=()
        if [[ "$file" == *[\*\?\[]* ]]; then
            for m in $file; do [ -e "$m" ] && matches+=("$m${target#"$file"}"); done
        elif [ -e "$file" ]; then matches=("$target"); fi
        if [ ${#matches[@]} = 0 ]; then
            printf '%s\tMISSING (not run)\t0\t\n' "$target" >> "$status"; log "tests: $target: MISSING (not run)"; continue
        fi
        for m in "${matches[@]}"; do
            safe="$(echo "$m ${args[*]:-}" | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-80)"
            tmo="${AFKERN_GPU_TEST_TIMEOUT:-200}"
            for m2 in "${envs[@]}"; do [[ "$m2" == AFKERN_GPU_TEST_TIMEOUT=* ]] && tmo="${m2#*=}"; done
            while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done  # a free slot
            tmo=$(budget "$tmo")
            if [ "$tmo" -lt 20 ]; then
                printf '%s\tSKIPPED (deadline)\t0\t\n' "$m" >> "$status"; log "tests: $m: skipped (deadline)"; continue
            fi
            run_entry "$m" "$safe" "$tmo" "${#envs[@]}" "${envs[@]}" "${args[@]}" &
        done
    done < "$list"
    [ "$which" = early ] && EARLY_STARTED=1
    return 0
}

st_tests() {
    env_header
    ensure_afkern || return 1
    local list="${AFKERN_GPU_TESTS:-scripts/gpu_tests.txt}" rc
    [ -f "$list" ] || { log "FAILED: no test list $list"; return 1; }
    mkdir -p "$LOGS/junit"; [ -n "$EARLY_STARTED" ] || : > "$LOGS/tests_status.tsv"
    launch_entries rest
    wait
    echo "kernel tests (list: $list; logs: tests_*.log):" > "$LOGS/summary_tests.tmp"
    "$PY" "$ROOT/scripts/gpu_tools.py" tests-summary "$LOGS/tests_status.tsv" "$LOGS/junit" >> "$LOGS/summary_tests.tmp"; rc=$?
    mv "$LOGS/summary_tests.tmp" "$LOGS/summary_tests.txt"
    cat "$LOGS/summary_tests.txt"
    NOTE="$(tail -n1 "$LOGS/summary_tests.txt" | awk -F'|' '{gsub(/ /,"",$4); gsub(/ /,"",$5); gsub(/ /,"",$6); print $4" passed, "$5" failed, "$6" errors"}')"
    return $rc
}

st_ceilings() {
    env_header
    ensure_slug
    local dry=""; [ "$DRY" = 1 ] && dry="--dry"
    safepy timeout -k 10 "$(budget 120)" "$PY" "$ROOT/scripts/gpu_ceilings.py" --out-root "$RESULTS_ROOT/gpu-ceilings" $dry \
        2>&1 | tee "$LOGS/ceilings.log"
    local rc=${PIPESTATUS[0]}
    sed -n '/^ceilings of /,$p' "$LOGS/ceilings.log" > "$LOGS/summary_ceilings.txt"
    NOTE="$(grep -o '^| copy[^|]*| [0-9.]* GB/s' "$LOGS/ceilings.log" | awk -F'|' '{print $3}') ; bf16 $(grep -o '^| matmul bfloat16[^|]*| [0-9.]* TFLOP/s' "$LOGS/ceilings.log" | awk -F'|' '{print $3}')"
    return $rc
}

bench_common() {
    if [ "$DRY" = 1 ]; then
        echo "--device cpu --dtype float32 --hidden-size 64 --intermediate-size 128 --heads 4 --seq-len 32 --repeats 2 --warmup 1 --warmup-ms 0 --min-sample-ms 1 --check-tokens 32 --no-progress"
    else
        echo "--device cuda --dtype bfloat16 --seq-len 128 --check-tokens 512 --no-progress"
    fi
}

run_bench() {  # run_bench PART CAP ARGS... (results: $RESULTS_ROOT/gpu-PART$AFKERN_GPU_TAG/<slug>/)
    local part="$1${AFKERN_GPU_TAG:-}" cap=$2; shift 2
    env_header
    ensure_afkern || return 1
    ensure_slug
    [ -f "$RESULTS_ROOT/gpu-ceilings/$SLUG/ceilings.json" ] || { log "no ceilings for $SLUG yet: measuring them first"; st_ceilings; }
    hub_env || return 1
    local providers="${AFKERN_GPU_PROVIDERS:-${PART_PROVIDERS:-plain,plain_layer,reference,adapters,torch,triton,cuda}}" b rc
    # dry run: the Triton interpreter takes seconds a call (the tests' dry run covers the triton backend)
    [ "$DRY" = 1 ] && providers="${providers//,triton/}"
    local -a extra_env=()
    [ "$DRY" = 1 ] && extra_env=(TRITON_INTERPRET=1)
    b=$(budget "$cap")
    log "afkern-bench $part: $* (budget $b s; log bench-$part.log)"
    # shellcheck disable=SC2046
    env "${extra_env[@]}" PYTHONPATH="$BENCH_PP" PYTHONSAFEPATH=1 timeout -s INT -k 20 "$b" "$PY" -m afkern.bench \
        $(bench_common) --providers "$providers" --output-dir "$RESULTS_ROOT/gpu-$part" "$@" ${AFKERN_GPU_BENCH_ARGS:-} \
        > "$LOGS/bench-$part.log" 2>&1
    rc=$?
    [ $rc = 124 ] && log "afkern-bench $part: stopped at its budget; bench.csv keeps every N finished"
    grep -E "not timed|Error|error:|Traceback|^targets|^  (met|MISSED)| met$| MISSED$" "$LOGS/bench-$part.log" | tail -n 12
    safepy "$PY" "$ROOT/scripts/gpu_tools.py" report "$RESULTS_ROOT" "$SLUG" --parts "gpu-$part" > "$LOGS/summary_$part.txt" 2>&1
    { echo "benchmark $part ($SLUG; afkern-bench rc $rc; full table: bench-$part.log, results: $RESULTS_ROOT/gpu-$part/$SLUG/):"
      cat "$LOGS/summary_$part.txt"; } > "$LOGS/summary_$part.tmp" && mv "$LOGS/summary_$part.tmp" "$LOGS/summary_$part.txt"
    cat "$LOGS/summary_$part.txt"
    NOTE="afkern-bench rc $rc"
    return $rc
}

NS="${AFKERN_GPU_NS:-1,2,4,8,16,32,64}"
TOK="${AFKERN_GPU_TOKENS:-4096}"
LAY="${AFKERN_GPU_LAYERS:-12}"
if [ "$DRY" = 1 ]; then NS="${AFKERN_GPU_NS:-1,2}"; TOK="${AFKERN_GPU_TOKENS:-64}"; LAY="${AFKERN_GPU_LAYERS:-2}"; fi
QUICK_NS="1,16,64"; QUICK_MN=16; QUICK_REP=(--repeats 5)
[ "$DRY" = 1 ] && { QUICK_NS="1,2"; QUICK_MN=2; QUICK_REP=(); }

# call 1's benchmark leaves out the naive reference provider (the float64 guard checks every provider anyway)
st_quick() { PART_PROVIDERS=plain,plain_layer,adapters,torch,triton,cuda run_bench quick 330 --n-adapters "$QUICK_NS" --tokens "$TOK" --modes forward,full --model-n-adapters "$QUICK_MN" \
                 --model-tokens "$TOK" --layers "$LAY" "${QUICK_REP[@]}"; }
st_bench_block() { run_bench block 480 --no-model --n-adapters "$NS" --tokens "$TOK"; }
st_bench_infer() { run_bench infer 480 --no-block --model-n-adapters "$NS" --model-tokens "$TOK" --layers "$LAY" --model-modes inference; }
st_bench_train() { run_bench train 480 --no-block --model-n-adapters "$NS" --model-tokens "$TOK" --layers "$LAY" --model-modes train_step; }

st_autotune() {
    env_header
    ensure_afkern || return 1
    local b dry="" rc; [ "$DRY" = 1 ] && dry="--dry"
    b=$(budget 330)
    env AFKERN_TUNED_CONFIGS=off PYTHONPATH="$PYTHONPATH" timeout -s INT -k 15 "$b" "$PY" "$ROOT/scripts/gpu_autotune.py" \
        --out-root "$RESULTS_ROOT/gpu-autotune" --tuned-file "$TUNED_FILE" --budget-s $(( b > 120 ? b - 60 : b / 2 )) $dry \
        --n-adapters "${AFKERN_GPU_TUNE_NS:-16,1,64}" --dtypes "${AFKERN_GPU_TUNE_DTYPES:-bfloat16,float16,float32}" \
        > "$LOGS/autotune.log" 2>&1
    rc=$?
    sed -n '/^autotune on /,$p' "$LOGS/autotune.log" > "$LOGS/summary_autotune.txt"
    [ -s "$LOGS/summary_autotune.txt" ] || tail -n 25 "$LOGS/autotune.log" > "$LOGS/summary_autotune.txt"
    cat "$LOGS/summary_autotune.txt"
    NOTE="$(grep -o '[0-9]* winners' "$LOGS/autotune.log" | head -n1); reading side $(grep -o 'reading side: [a-zA-Z]*' "$LOGS/autotune.log" | awk '{print $3}')"
    return $rc
}

st_graphs() {
    env_header
    ensure_afkern || return 1
    local b dry="" rc; [ "$DRY" = 1 ] && dry="--dry"
    b=$(budget 300)
    safepy timeout -s INT -k 15 "$b" "$PY" "$ROOT/scripts/gpu_graphs.py" --out-root "$RESULTS_ROOT/gpu-graphs" \
        --budget-s $(( b > 60 ? b - 20 : b / 2 )) $dry > "$LOGS/graphs.log" 2>&1
    rc=$?
    sed -n '/^decode step under CUDA graphs/,$p' "$LOGS/graphs.log" > "$LOGS/summary_graphs.txt"
    [ -s "$LOGS/summary_graphs.txt" ] || tail -n 25 "$LOGS/graphs.log" > "$LOGS/summary_graphs.txt"
    cat "$LOGS/summary_graphs.txt"
    NOTE="$(grep -m1 '^captured:' "$LOGS/graphs.log")"
    return $rc
}

st_report() {
    ensure_slug
    safepy "$PY" "$ROOT/scripts/gpu_tools.py" report "$RESULTS_ROOT" "$SLUG" > "$LOGS/summary_report.txt" 2>&1
    local rc=$?
    cat "$LOGS/summary_report.txt"
    return $rc
}

# ------------------------------------------------------------------------------------------ packing
pack() {
    local f paths=() sz
    ensure_slug
    {
        stage_summaries
        echo
        echo "stages ($(( $(now) - T0 )) s in all; device: ${SLUG}; results: $RESULTS_ROOT/gpu-*/$SLUG):"
        "$PY" "$ROOT/scripts/gpu_tools.py" stages "$STAGES_TSV"
    } > "$LOGS/summary.txt" 2>&1
    cp "$LOGS/summary.txt" "$OUTDIR/summary.txt"
    tar -czf "$OUTDIR/logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>/dev/null
    for f in "$RESULTS_ROOT"/gpu-*/"$SLUG"; do [ -d "$f" ] && paths+=("$f"); done
    [ -f "$TUNED_FILE" ] && paths+=("$TUNED_FILE")
    rm -f "$OUTDIR/results.tar.gz"
    [ ${#paths[@]} -gt 0 ] && tar -czf "$OUTDIR/results.tar.gz" -C "$ROOT" "${paths[@]}"
    rm -f "$OUTDIR/carry.tar.gz"
    if [ -n "$(ls -A "$ROOT/$CARRY" 2>/dev/null)" ]; then
        # carried back in, .gpu travels uncompressed with .whl (~16 MiB) and the tree under the 64 MiB limit:
        # the Triton cache goes along only while .gpu stays under 38 MiB and its archive under 15 MiB
        local raw; raw=$(du -sb "$ROOT/$CARRY" | cut -f1)
        if [ "$raw" -le $(( 38 * 1024 * 1024 )) ]; then
            tar -czf "$OUTDIR/carry.tar.gz" -C "$ROOT" "$CARRY"
            sz=$(stat -c %s "$OUTDIR/carry.tar.gz")
        else
            sz=$raw
        fi
        if [ "$sz" -gt $(( 15 * 1024 * 1024 )) ]; then
            log "$CARRY is $(( raw / 1048576 )) MiB: carrying the extension without the Triton cache"
            tar -czf "$OUTDIR/carry.tar.gz" -C "$ROOT" "$CARRY/ext"
        fi
    fi
    for f in "$OUTDIR"/*; do
        [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $(( 16 * 1024 * 1024 )) ] && log "WARNING: $f is over 16 MiB: it will not come back"
    done
    echo
    echo "==== packed under $OUTDIR: $(cd "$OUTDIR" && ls -sh --format=commas 2>/dev/null)"
    cat "$LOGS/summary.txt"
}

# ------------------------------------------------------------------------------------------ main
CALL1=(build tests ceilings quick)
CALL2=(autotune graphs)
CALL1_DEADLINE=470 CALL2_DEADLINE=330  # seconds; the device-tool calls' timeout_s are 500 and 360
ARGS=("$@"); [ ${#ARGS[@]} = 0 ] && ARGS=(build tests)
STAGES=()
DEFAULT_DEADLINE=540
for a in "${ARGS[@]}"; do
    case "$a" in
        call1) STAGES+=("${CALL1[@]}"); DEFAULT_DEADLINE=$CALL1_DEADLINE ;;
        call2) STAGES+=("${CALL2[@]}"); DEFAULT_DEADLINE=$CALL2_DEADLINE
               export AFKERN_GPU_AUTOBUILD="${AFKERN_GPU_AUTOBUILD:-0}" ;;  # the carried .gpu/ext or none: no 2-min build
        plan)  # what the two calls run, for tests/test_gpu_plan.py and the runbook; no work
            echo "call1: ${CALL1[*]}"; echo "call2: ${CALL2[*]}"
            for s in "${CALL1[@]}" "${CALL2[@]}"; do echo "cap $s $(stage_cap "$s")"; done
            echo "deadline call1 $CALL1_DEADLINE"; echo "deadline call2 $CALL2_DEADLINE"
            exit 0 ;;
        day1) STAGES+=(build tests) ;;
        full) STAGES+=(bench-block bench-infer bench-train) ;;
        all) STAGES+=("${CALL1[@]}" "${CALL2[@]}" bench-block bench-infer bench-train) ;;
        build|tests|ceilings|quick|autotune|graphs|bench-block|bench-infer|bench-train|report) STAGES+=("$a") ;;
        -h|--help|help) usage; exit 0 ;;
        *) echo "gpu_validate: unknown stage '$a'"; usage; exit 2 ;;
    esac
done
if [ "$DRY" != 1 ] && ! gpu_present; then
    for s in "${STAGES[@]}"; do [ "$s" = report ] || { echo "gpu_validate: no CUDA device here (AFKERN_GPU_DRY=1 for the CPU dry run)"; exit 2; }; done
fi
DEADLINE=$(( T0 + ${AFKERN_GPU_DEADLINE_S:-$DEFAULT_DEADLINE} ))
rm -rf "$LOGS"
mkdir -p "$LOGS" "$OUTDIR" "$ROOT/$CARRY/ext" "$TRITON_CACHE_DIR"
: > "$STAGES_TSV"
log "stages: ${STAGES[*]}; deadline in $(left) s; dry=$DRY; python $PY; out $OUTDIR"
RAN=()
trap 'echo; log "interrupted"; record interrupted FAILED 0 "signal"; wait; pack; exit 130' INT TERM
for s in "${STAGES[@]}"; do
    RAN+=("$s")
    run_stage "$s" "st_${s//-/_}"
done
trap - INT TERM
pack
exit $OVERALL
