#!/usr/bin/env bash
# Lint, then run the test suite (sets up .venv first when it is missing or stale). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/iapt ] || [ pyproject.toml -nt .venv/.installed ]; then
  bash scripts/setup.sh --no-run
  touch .venv/.installed
fi
.venv/bin/ruff check src tests benchmarks  # lint (pyproject [tool.ruff]); a finding fails the run
exec .venv/bin/python -m pytest "$@"
