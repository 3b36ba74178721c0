#!/usr/bin/env bash
# Rebuilds the two example tenants in examples/adapters/ for `iapt serve`.
# They are cells of benchmarks/quality.py (IAPT at its default size, r = 32: 1,128,360 parameters; 20 steps of 4
# examples, LR 3e-4 as tuned there): e2e seed 1, sentiment seed 2. Their test scores are in benchmarks/QUALITY.md.
# About 3 minutes each on 2 CPU cores; the benchmark trained them with 1 thread (OMP_NUM_THREADS=1), so other
# thread counts reproduce them up to float rounding, which 20 steps of this training can amplify.
set -euo pipefail
cd "$(dirname "$0")/.."
IAPT=${IAPT:-.venv/bin/iapt}
build() {  # task seed
  local run="runs/examples/$1"
  rm -rf "$run"
  "$IAPT" train --task "$1" --seed "$2" --out "$run" --budget 1128360 --max-steps 20 --batch-size 4 --lr 3e-4 \
    --max-length 192 --max-dev-examples 16 --eval-every 20 --no-progress
  rm -rf "examples/adapters/$1.new"
  cp -r "$run/adapter" "examples/adapters/$1.new"
  rm -rf "examples/adapters/$1"
  mv "examples/adapters/$1.new" "examples/adapters/$1"
}
build e2e 1
build sentiment 2
