#!/usr/bin/env bash
# Rebuilds the two example tenants in examples/adapters/ for `iapt serve`.
# Both are trained with the demo's recipe (`iapt demo`): IAPT r = 45 (1,579,590 parameters, the default
# pad-anchored start), 150 steps of 8 examples, LR 3e-3 with 10% warm-up, max length 192, 32 dev examples,
# bi-level activations with a Θ step every 5 steps, bf16 backbone where the CPU has it. About 10 minutes each
# on 2 quiet CPU cores. The sentiment tenant is the adapter `iapt demo` trained (same settings; 79.0% on 100 test
# reviews, majority class 39.0%, benchmarks/RESULTS.md "The demo"); e2e was built by this script (one thread,
# beside other jobs): ROUGE-L 62.2 / BLEU 44.8 on the 22 test MRs (`iapt eval --task e2e`), zero-shot 27.9 / 8.0.
set -euo pipefail
cd "$(dirname "$0")/.."
IAPT=${IAPT:-.venv/bin/iapt}
DTYPE=$(.venv/bin/python -c "from iapt.models import fast_dtype; print(fast_dtype())")
build() {  # task
  local run="runs/examples/$1"
  rm -rf "$run"
  "$IAPT" train --task "$1" --out "$run" --bottleneck 45 --max-steps 150 --batch-size 8 --lr 3e-3 \
    --warmup-ratio 0.1 --max-length 192 --max-dev-examples 32 --eval-every 150 --rational-every 5 \
    --dtype "$DTYPE" --no-progress
  rm -rf "examples/adapters/$1.new"
  cp -r "$run/adapter" "examples/adapters/$1.new"
  rm -rf "examples/adapters/$1"
  mv "examples/adapters/$1.new" "examples/adapters/$1"
}
tasks=("$@")  # default: both tenants
[ ${#tasks[@]} -eq 0 ] && tasks=(sentiment e2e)
for task in "${tasks[@]}"; do
  build "$task"
done
