#!/usr/bin/env bash
# The Python wheels bench/gpu.py needs on a GPU machine that has no network, fetched here.
#
#     bash bench/gpu_wheels.sh [--with-hf]      (from the repository root, on a machine with PyPI)
#
# Fills bench/wheels/ (git-ignored) with wheels for CPython 3.12 on x86-64 Linux. The target
# image (one H200, Python 3.12, torch 2.11 + CUDA 13) already holds torch, the nvidia-* runtime,
# numpy, transformers, tokenizers, safetensors, huggingface_hub, psutil, tensorboard and pyarrow;
# what mtrain needs beyond them is carried:
#   megatron-core   the version this machine's tests run (pyproject: >=0.12.1,<0.13). PyPI has
#                   no cp312 wheel of 0.12.x, only its source: the wheel is built here with a
#                   Python 3.12 (it compiles megatron's small dataset helper).
#   hydra-core, omegaconf   mtrain's config layer; antlr4-python3-runtime 4.9.3, which both
#                   need, is source-only on PyPI too (pure Python: the built wheel is universal).
# --with-hf also carries transformers, tokenizers and safetensors at this machine's versions, so
# that the HF baseline runs the transformers the CPU tests ran (the image's huggingface_hub
# satisfies them; huggingface_hub 2.x would need httpx2, which the image lacks).
# torch and nvidia-* are never fetched: every download is --no-deps, with an explicit list.
#
# Everything that travels to the device (the working tree plus carried folders) must stay under
# 64 MiB; the script adds the two up and fails if they are over.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/bench/wheels"
LIMIT_MIB=64
WITH_HF=0
for arg in "$@"; do
    case "$arg" in
        --with-hf) WITH_HF=1 ;;
        *) echo "gpu_wheels.sh: unknown argument $arg (only --with-hf)" >&2; exit 2 ;;
    esac
done

# Versions: what this machine's Python (the one the CPU tests use) has installed.
PY=${PYTHON:-python}
version() {
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null \
        || { echo "gpu_wheels.sh: $1 is not installed in $PY; install mtrain's dependencies first" >&2; exit 1; }
}
MEGATRON=$(version megatron-core)
case "$MEGATRON" in
    0.12.*) ;;
    *) echo "gpu_wheels.sh: megatron-core $MEGATRON here is outside pyproject's >=0.12.1,<0.13" >&2; exit 1 ;;
esac

# A Python 3.12 to build the source-only packages for the device's interpreter.
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            PY312=$candidate
            break
        fi
    done
fi
if [ -z "$PY312" ]; then
    echo "gpu_wheels.sh: no Python 3.12 found to build megatron-core's wheel; set PYTHON312=/path/to/python3.12" >&2
    exit 1
fi

rm -rf "$DEST"
mkdir -p "$DEST"
trap 'echo "gpu_wheels.sh: failed; bench/wheels is incomplete, run the script again" >&2' ERR

BINARY=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --dest "$DEST")
WANT=("hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)")
if [ "$WITH_HF" = 1 ]; then
    WANT+=("transformers==$(version transformers)" "tokenizers==$(version tokenizers)"
           "safetensors==$(version safetensors)")
fi
"$PY" -m pip download -q "${BINARY[@]}" "${WANT[@]}"

# Built from source with Python 3.12 (build requirements come from PyPI in an isolated env).
"$PY312" -m pip wheel -q --no-deps --wheel-dir "$DEST" \
    "megatron-core==$MEGATRON" "antlr4-python3-runtime==4.9.3"

# Nothing of torch or the CUDA runtime may slip in: the device's own must stay in charge.
if ls "$DEST" | grep -Eiq '^(torch|nvidia|triton)[-_]'; then
    echo "gpu_wheels.sh: a torch/nvidia/triton wheel landed in bench/wheels; remove it" >&2
    exit 1
fi

mib() { echo $(( ($1 + 1048575) / 1048576 )); }
WHEELS=$(du -sb "$DEST" | cut -f1)
# What the device run sends besides: tracked and untracked-but-not-ignored files.
TREE=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
TOTAL=$((WHEELS + TREE))
ls -l "$DEST" | tail -n +2 | awk '{printf "  %9d  %s\n", $5, $9}'
echo "bench/wheels: $(mib "$WHEELS") MiB; working tree: $(mib "$TREE") MiB; together $(mib "$TOTAL") MiB (limit $LIMIT_MIB MiB)"
if [ "$TOTAL" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_wheels.sh: over the $LIMIT_MIB MiB that may travel to the device; drop --with-hf or trim the tree" >&2
    exit 1
fi
