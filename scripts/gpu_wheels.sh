#!/usr/bin/env bash
# Fetch HERE (where pip reaches PyPI) the wheels the GPU image lacks, into the git-ignored folder
# .whl/, for the device calls to carry (docs/GPU_RUNBOOK.md). The image has Python 3.12, torch 2.11
# (CUDA 13.0), triton 3.6, transformers 5.17, tokenizers 0.23, huggingface_hub 1.x, safetensors,
# pytest, pytest-benchmark, matplotlib, numpy -- and no `adapters`, and no internet.
#
#   bash scripts/gpu_wheels.sh            # fetch (skips wheels already there), check, list sizes
#   bash scripts/gpu_wheels.sh --check    # only check the layout: install into a temp target with this
#                                         # machine's Python and import the AdapterHub stack from it
#
# .whl/hub/  the AdapterHub baseline stack: adapters 1.3.0 needs transformers ~= 4.57.6, which needs
#            tokenizers < 0.23 and huggingface_hub < 1.0: none of them can share a process with the
#            image's transformers 5.17 / tokenizers 0.23 / huggingface_hub 1.x. gpu_validate.sh installs
#            them with `pip install --target <own folder>` and puts that folder FIRST on PYTHONPATH
#            for the benchmark process only (every provider of that process then runs on transformers
#            4.57.6, the version afkern's CPU suite and AdapterHub parity tests use); the kernel tests
#            and every other stage keep the image's transformers 5.17.
# .whl/*.whl (top level): extra wheels for the main environment; none are needed today.
#
# The other dependencies of the stack are in the image at versions it accepts: safetensors 0.8
# (>= 0.4.3), numpy, packaging, pyyaml, regex, requests, tqdm, filelock, fsspec, hf-xet,
# typing-extensions. Pure-Python wheels and tokenizers' abi3 wheel, so the --check here (Python 3.11)
# installs the very files the device installs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEST="$ROOT/.whl"
HUB=(adapters==1.3.0 transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
LIMIT_MIB=40

grep -qxF '/.whl/' .gitignore 2>/dev/null || echo "gpu_wheels: WARNING: /.whl/ is not in .gitignore (it must not be committed)"

if [ "${1:-}" != "--check" ]; then
    mkdir -p "$DEST/hub"
    for spec in "${HUB[@]}"; do
        name="${spec%%==*}"; ver="${spec##*==}"
        norm="$(echo "$name" | tr '-' '_')"
        if compgen -G "$DEST/hub/${norm}-${ver}-*.whl" >/dev/null; then
            echo "gpu_wheels: have $spec"
            continue
        fi
        echo "gpu_wheels: fetching $spec"
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
            -d "$DEST/hub" "$spec"
    done
    # one version of each package only (two would stop the install on the device)
    dups="$(ls "$DEST/hub" | sed -n 's/^\([A-Za-z0-9_.]*\)-[0-9].*\.whl$/\1/p' | sort | uniq -d)"
    [ -z "$dups" ] || { echo "gpu_wheels: FAILED: several versions of: $dups (in $DEST/hub)"; exit 1; }
fi

echo "gpu_wheels: what each wheel requires (skip what the image has):"
for w in "$DEST"/hub/*.whl; do
    echo "  $(basename "$w"): $(unzip -p "$w" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' | tr '\n' ';' | sed 's/;$//')"
done

# The layout check: a temp target folder, installed exactly as the device installs it, imported
# with that folder first on PYTHONPATH in a fresh process.
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TMP/hub" "$DEST"/hub/*.whl
# What the image provides and this Python may lack: fetched into a second folder, AFTER the stack on
# PYTHONPATH (as the image's site-packages come after it there), for the check only.
IMAGE_HAS=(requests regex yaml filelock fsspec packaging tqdm numpy safetensors typing_extensions torch)
missing=()
for m in "${IMAGE_HAS[@]}"; do "$PY" -c "import $m" 2>/dev/null || missing+=("$m"); done
EXTRA=""
if [ ${#missing[@]} -gt 0 ]; then
    pkgs=$(printf '%s\n' "${missing[@]}" | sed 's/^yaml$/pyyaml/' | tr '\n' ' ')
    echo "gpu_wheels: this Python lacks $pkgs(the GPU image has them): fetching them for the check only"
    "$PY" -m pip install -q --no-compile --target "$TMP/image" $pkgs
    EXTRA=":$TMP/image"
fi
PYTHONPATH="$TMP/hub${PYTHONPATH:+:$PYTHONPATH}$EXTRA" "$PY" - "$TMP/hub" <<'EOF'
import sys
hub = sys.argv[1]
import transformers, tokenizers, huggingface_hub, adapters  # noqa: E401
for m in (transformers, tokenizers, huggingface_hub, adapters):
    assert m.__file__.startswith(hub), f"{m.__name__} imported from {m.__file__}, not from {hub}"
assert transformers.__version__ == "4.57.6" and adapters.__version__ == "1.3.0", (transformers.__version__, adapters.__version__)
from transformers import BertConfig, BertModel
from adapters import SeqBnConfig
from adapters.composition import Fuse
cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=16)
m = BertModel(cfg)
adapters.init(m)
for n in ("a", "b"):
    m.add_adapter(n, config=SeqBnConfig(reduction_factor=4))
m.add_adapter_fusion(Fuse("a", "b"))
m.set_active_adapters(Fuse("a", "b"))
import torch
out = m(inputs_embeds=torch.randn(1, 3, 32)).last_hidden_state
print(f"gpu_wheels: layout OK: adapters {adapters.__version__}, transformers {transformers.__version__}, tokenizers "
      f"{tokenizers.__version__}, huggingface_hub {huggingface_hub.__version__} import from the target folder "
      f"(python {sys.version.split()[0]}, torch {torch.__version__}); a BERT with Fuse(a, b) runs: {tuple(out.shape)}")
EOF

total=$(du -cb "$DEST"/hub/*.whl $(compgen -G "$DEST/*.whl" || true) | tail -n1 | cut -f1)
echo "gpu_wheels: wheels in $DEST (carry \".whl\" in the device calls):"
( cd "$DEST" && find . -name '*.whl' -printf '%8k KiB  %P\n' | sort -k3 )
echo "gpu_wheels: total $(( total / 1024 )) KiB"
[ "$total" -le $(( LIMIT_MIB * 1024 * 1024 )) ] || { echo "gpu_wheels: FAILED: over ${LIMIT_MIB} MiB"; exit 1; }
