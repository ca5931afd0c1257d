#!/usr/bin/env bash
# Installs att3d_jax and everything it needs into the active Python (3.11).
# torch goes first and alone: see the note at the top of requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install "$(grep -E '^torch==' requirements.txt)"
python -m pip install -r requirements.txt
python -m pip install -e ".[real,demo,test]"  # the package; its metadata matches the pins
