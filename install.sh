#!/usr/bin/env bash
# Installs att3d_jax and everything it needs into the active Python (3.11).
#
#   bash install.sh              CPU: the default, what the tests and CI use
#   bash install.sh --gpu        + jax's CUDA 12 build (NVIDIA GPU, Linux x86_64, driver >= 525)
#   bash install.sh --gpu=cuda13 + jax's CUDA 13 build (driver >= 580)
#   bash install.sh --tpu        + jax's TPU build (libtpu; Cloud TPU VMs)
#
# torch goes first and alone: see the note at the top of requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  "") jax_extra="" ;;
  --gpu | --gpu=cuda12) jax_extra="cuda12" ;;
  --gpu=cuda13) jax_extra="cuda13" ;;
  --tpu) jax_extra="tpu" ;;
  *) echo "install.sh: unknown option '$1'; use no option (CPU), --gpu, --gpu=cuda13 or --tpu" >&2
     exit 2 ;;
esac
python -m pip install "$(grep -E '^torch==' requirements.txt)"
python -m pip install -r requirements.txt
python -m pip install -e ".[real,demo,test]"  # the package; its metadata matches the pins
if [[ -n "$jax_extra" ]]; then
  # The accelerator build of the pinned jax: its plugin and CUDA libraries (or libtpu).
  jax_version="$(grep -E '^jax==' requirements.txt | cut -d= -f3)"
  python -m pip install "jax[$jax_extra]==$jax_version"
  python -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())"
fi
