#!/usr/bin/env bash
# Prepares the folder that benchmarks/accelerator_check.sh needs on an accelerator machine
# without network (Python 3.12, x86_64, jax + CUDA and PyTorch preinstalled). Run it here,
# from the repository root, in the project's environment (it reads the pinned versions from
# it and computes the MiniLM text tables with it):
#
#   bash benchmarks/prepare_accelerator_check.sh [FOLDER]      # FOLDER: .accel by default
#
# FOLDER (git-ignored) then holds:
#   wheels/  the packages the machine lacks: diffusers, ml_collections, trimesh, tensorboardX
#   pinned/  flax, optax, orbax-checkpoint, chex at the versions tested here (used there only
#            if they import with its jax; otherwise its own are used)
#   hub/     huggingface_hub and its dependencies, requests and its: installed there only if
#            diffusers does not import with the machine's own
#   shapes_text.npz  configs/shapes.py's MiniLM text tables, float16 (the MiniLM weights
#            are too large to carry)
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER="${1:-.accel}"
PYTHON="${PYTHON:-python}"

# The version installed here of each package, as NAME==VERSION.
pinned() {
  "$PYTHON" - "$@" <<'PY'
import importlib.metadata
import sys
print(" ".join(f"{name}=={importlib.metadata.version(name)}" for name in sys.argv[1:]))
PY
}

# Wheels for CPython 3.12 on x86_64 Linux, without their dependencies (chosen here).
download() {
  local target="$1"
  shift
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$target" "$@"
}

rm -rf "$FOLDER"
mkdir -p "$FOLDER/wheels" "$FOLDER/pinned" "$FOLDER/hub"
download "$FOLDER/wheels" $(pinned diffusers ml_collections trimesh tensorboardX)
download "$FOLDER/pinned" $(pinned flax optax orbax-checkpoint chex)
download "$FOLDER/hub" $(pinned huggingface_hub httpx2 httpcore2 anyio h11 idna truststore \
  click hf-xet fsspec filelock typing_extensions requests urllib3 certifi charset_normalizer)
"$PYTHON" -m benchmarks.accelerator --save_text_tables "$FOLDER/shapes_text.npz"

# What travels: the tracked files plus this folder, under the 64 MiB a transfer takes.
tracked_kib=$(git ls-files -z | du -ck --files0-from=- | tail -1 | cut -f1)
folder_kib=$(du -sk "$FOLDER" | cut -f1)
echo "prepared $FOLDER: $((folder_kib / 1024)) MiB (+ tracked files $((tracked_kib / 1024)) MiB)"
if (( tracked_kib + folder_kib > 60 * 1024 )); then
  echo "warning: more than 60 MiB in all; the transfer limit is 64 MiB" >&2
fi
