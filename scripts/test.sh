#!/usr/bin/env bash
# Lint, then run the test suite (sets up .venv first when it is missing or stale). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/iapt ] || [ pyproject.toml -nt .venv/.installed ]; then
  bash scripts/setup.sh --no-run
  touch .venv/.installed
fi
.venv/bin/ruff check src tests benchmarks  # lint (pyproject [tool.ruff]); a finding fails the run
.venv/bin/ruff format --check src tests benchmarks  # layout: `ruff format src tests benchmarks` fixes it
.venv/bin/python -m mypy src/iapt  # types (pyproject [tool.mypy]: check_untyped_defs); an error fails the run
# --- vLLM plugin (docs/VLLM.md): tests/vllm run in their own venv, .venv-vllm (scripts/setup_vllm.sh builds it,
# quick when built). The main suite runs in .venv without them, then tests/vllm with the same options; a path
# under tests/vllm runs only there, another path only the main suite. Both must pass. IAPT_NO_VLLM=1 skips this.
if [ "${IAPT_NO_VLLM:-0}" != 1 ]; then
  main=1 plugin=1
  for arg in "$@"; do
    case "$arg" in
      tests/vllm*) main=0 ;;
      tests*) plugin=0 ;;
    esac
  done
  if [ "$main" = 0 ] && [ "$plugin" = 0 ]; then
    echo "scripts/test.sh: give paths under tests/vllm or other paths, not both (they run in different venvs)" >&2
    exit 2
  fi
  status=0
  if [ "$main" = 1 ]; then
    .venv/bin/python -m pytest --ignore=tests/vllm "$@" || status=$?
  fi
  if [ "$plugin" = 1 ]; then
    bash scripts/setup_vllm.sh
    if [ "$main" = 1 ]; then
      .venv-vllm/bin/python -m pytest "$@" tests/vllm || { code=$?; [ "$status" != 0 ] || status=$code; }
    else
      .venv-vllm/bin/python -m pytest "$@" || { code=$?; [ "$status" != 0 ] || status=$code; }
    fi
  fi
  exit "$status"
fi
# --- end of the vLLM block
exec .venv/bin/python -m pytest "$@"
