#!/usr/bin/env bash
# The accelerator check: `python -m benchmarks.run_all --gpu` on a GPU machine without
# network, in under 8 minutes, writing docs/benchmarks_gpu.md. Run from the repository root:
#
#   bash benchmarks/accelerator_check.sh
#
# Needs: python3 (or $PYTHON) with jax + CUDA, PyTorch with CUDA, numpy, safetensors,
# tokenizers, transformers, imageio, scikit-image, tqdm; the rest comes from the folder
# benchmarks/prepare_accelerator_check.sh filled ($ACCEL_DIR, default .accel). When $OUT is
# set, the table and the full log are copied there. It refuses to run without a GPU/TPU.
# ACCELERATOR_CHECK_DRY_RUN=1 runs the same steps on a CPU at test sizes (tests only; the
# table then goes to $OUT alone, docs/ are left alone).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# Each row is its own process, PyTorch next to JAX in one: JAX must not reserve most of the
# GPU's memory up front (its default).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHON="${PYTHON:-python3}"
ACCEL_DIR="${ACCEL_DIR:-.accel}"
SITE="${ACCEL_SITE:-/tmp/att3d_accel_site}"
DRY_RUN="${ACCELERATOR_CHECK_DRY_RUN:-0}"
LOG="$(mktemp /tmp/accelerator_check.XXXXXX.log)"
say() { echo "[accelerator_check $(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

if [[ "$DRY_RUN" != 1 ]]; then
  backend=$("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>>"$LOG" || echo "none")
  if [[ "$backend" != gpu && "$backend" != tpu ]]; then
    say "refusing: JAX ($PYTHON) sees no GPU or TPU (backend: $backend). This check measures" \
        "an accelerator; run it on a machine with one (bash install.sh --gpu installs CUDA jax)."
    exit 2
  fi
fi

# Installs the wheels of $1 into $SITE/$1 and puts that first on PYTHONPATH.
install_wheels() {
  local name="$1"
  shopt -s nullglob
  local wheels=("$ACCEL_DIR/$name"/*.whl)
  shopt -u nullglob
  if (( ${#wheels[@]} == 0 )); then
    say "no wheels in $ACCEL_DIR/$name: using the installed packages"
    return 1
  fi
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE/$name" "${wheels[@]}" >>"$LOG" 2>&1; then
    # No pip: a wheel is a zip of what goes into site-packages (enough for pure Python).
    say "pip could not install $ACCEL_DIR/$name; unpacking the wheels instead"
    for wheel in "${wheels[@]}"; do
      "$PYTHON" -m zipfile -e "$wheel" "$SITE/$name" >>"$LOG" 2>&1 || { say "unpacking $wheel failed"; return 1; }
    done
  fi
  export PYTHONPATH="$SITE/$name${PYTHONPATH:+:$PYTHONPATH}"
  say "installed ${#wheels[@]} wheels of $ACCEL_DIR/$name"
}
imports() { "$PYTHON" -c "$1" >>"$LOG" 2>&1; }

rm -rf "$SITE"
install_wheels wheels
base_path="${PYTHONPATH:-}"
if install_wheels pinned; then
  if ! imports "import flax, optax, orbax.checkpoint, chex; from att3d_jax import train"; then
    say "the pinned flax/optax/orbax/chex do not import with this jax: using the machine's own"
    export PYTHONPATH="$base_path"
  fi
fi
if ! imports "import diffusers"; then
  say "diffusers does not import with this huggingface_hub: adding $ACCEL_DIR/hub"
  install_wheels hub
  imports "import diffusers" || say "diffusers still does not import: its rows will fail (see the log)"
fi
"$PYTHON" - >>"$LOG" 2>&1 <<'PY'
import importlib.metadata, sys
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "torch", "diffusers",
         "huggingface_hub", "transformers", "numpy")
def version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "missing"
print("python", sys.version.split()[0], "|", ", ".join(f"{n} {version(n)}" for n in names))
PY
tail -1 "$LOG" >&2

args=(--gpu)
[[ -f "$ACCEL_DIR/shapes_text.npz" ]] && args+=(--text_tables "$ACCEL_DIR/shapes_text.npz")
if [[ "$DRY_RUN" == 1 ]]; then
  mkdir -p "${OUT:-/tmp}"
  args+=(--cpu_dry_run --out "${OUT:-/tmp}/benchmarks_gpu.md")
fi
say "python -m benchmarks.run_all ${args[*]}"
stamp="$(mktemp)"  # a table older than this is not this run's
# 445 s: the rows' own limits add up to 430 s; with the installs this stays under 8 minutes.
timeout "${ACCELERATOR_CHECK_TIMEOUT_S:-445}" "$PYTHON" -m benchmarks.run_all "${args[@]}" \
  > >(tee -a "$LOG") 2> >(tee -a "$LOG" >&2)
status=$?
sleep 1  # lets the tee processes flush
say "run_all exit status $status"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$LOG" "$OUT/accelerator_check.log"
  [[ "$DRY_RUN" != 1 && docs/benchmarks_gpu.md -nt "$stamp" ]] && cp docs/benchmarks_gpu.md "$OUT/"
fi
if [[ "$DRY_RUN" != 1 && docs/benchmarks_gpu.md -nt "$stamp" ]]; then
  echo; cat docs/benchmarks_gpu.md  # the table, last
fi
exit "$status"
